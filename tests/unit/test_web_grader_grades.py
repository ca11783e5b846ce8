"""Graders' grades in the web interface: the "Grader's grade" box of the result pages (``POST
/grader-grades`` and ``/grader-grades/remove``) and the agreement page (``GET /agreement``), on the
embedded database with photographs scored by the stand-in ensemble (tests/unit/test_grader_grades.py).
"""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import AuditEvent, GraderGrade, Image
from services.web import present
from tests.api_support import Key, sample_bytes, web_cookie
from tests.unit.test_grader_grades import scored  # noqa: F401  (the fixture)
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images
from workers import scoring

Scored = tuple[Key, Key, list[str]]


def _post(client: TestClient, cookie: dict[str, str], path: str, form: dict[str, str], **headers: str) -> Any:
    return client.post(path, headers=cookie | headers, data=form, follow_redirects=False)


def _grade(client: TestClient, cookie: dict[str, str], image_id: str, grade: str, who: str = "Dr A") -> Any:
    form = {"image_id": image_id, "grade": grade, "grader": who, "back": f"/images/{image_id}"}
    return _post(client, cookie, "/grader-grades", form)


def _remove(client: TestClient, cookie: dict[str, str], image_id: str) -> Any:
    return _post(
        client, cookie, "/grader-grades/remove", {"image_id": image_id, "back": f"/images/{image_id}"}
    )


def _rows(url: str) -> list[tuple[str, int | None, bool, str]]:
    with session_scope(url) as s:
        rows = s.scalars(select(GraderGrade).order_by(GraderGrade.image_id))
        return [(r.image_id, r.grade, r.gradable, r.grader) for r in rows]


def _audits(url: str) -> list[tuple[str, str | None, Any]]:
    with session_scope(url) as s:
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action.like("grader_grade.%")).order_by(AuditEvent.id)
        )
        return [(e.action, e.target_id, e.detail) for e in events]


def _shown(page: str) -> dict[str, str] | None:
    """The recorded grader's grade a page shows: its data-grade, label and grader (None: none)."""
    found = re.search(
        r'data-testid="grader-grade" data-grade="(\d?)"><strong>([^<]+)</strong>.*?'
        r'data-testid="grader-name">([^<]*)<',
        page,
        re.S,
    )
    if found is None:
        return None
    grade, label, who = found.groups()
    return {"grade": grade, "label": html.unescape(label), "grader": html.unescape(who)}


def _model_view(page: str) -> tuple[str, str, str]:
    """What the page says of the model's result: the banner's tone and headline, the photograph's grade."""
    tone = re.search(r'data-testid="verdict"[^>]*data-tone="([a-z]+)"', page)
    headline = re.search(r'data-testid="verdict-headline"[^>]*>([^<]+)<', page)
    grade = re.search(r'data-testid="photo-grade" data-grade="(\d?)"', page)
    assert tone and headline and grade, page[:2000]
    return tone.group(1), headline.group(1), grade.group(1)


# ------------------------------------------------------------------------------ the result page


def test_a_grade_recorded_through_the_form_is_shown_beside_the_models_and_audited_as_the_apis(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
) -> None:
    north, _, ids = scored
    cookie = web_cookie(client, north)
    api_before = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()
    page = client.get(f"/images/{ids[0]}", headers=cookie).text
    assert 'action="/grader-grades"' in page and _shown(page) is None
    assert 'data-testid="grader-remove"' not in page  # nothing to remove yet
    # the choices are named as the page names grades
    for value, label in present.GRADE_CHOICES:
        assert f'<option value="{value}">{label}</option>' in page
    model_before = _model_view(page)

    saved = _grade(client, cookie, ids[0], "3", "Dr A")
    # back at the photograph saved, which says so (a11y review, session 30: the page top, silently)
    back = f"/images/{ids[0]}?saved={ids[0]}#photo-{ids[0]}"
    assert saved.status_code == 303 and saved.headers["location"] == back
    assert _rows(url) == [(ids[0], 3, True, "Dr A")]
    page = client.get(saved.headers["location"], headers=cookie).text
    assert f'id="photo-{ids[0]}"' in page and 'data-testid="grader-saved"' in page
    assert _shown(page) == {"grade": "3", "label": "3 · Severe NPDR", "grader": "Dr A"}
    assert re.search(r"recorded \d{4}-\d\d-\d\d \d\d:\d\d UTC", page)
    # the model's grade, the banner and the API's result are the model's still
    assert _model_view(page) == model_before
    api_after = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()
    assert {k: v for k, v in api_after.items() if k != "grader_grade"} == {
        k: v for k, v in api_before.items() if k != "grader_grade"
    }
    assert api_after["grader_grade"]["grade"] == 3

    # replaced (the name trimmed, as the API does), then removed; removing again changes nothing
    assert _grade(client, cookie, ids[0], "ungradable", "  Dr B ").status_code == 303
    assert _rows(url) == [(ids[0], None, False, "Dr B")]
    page = client.get(f"/images/{ids[0]}", headers=cookie).text
    assert _shown(page) == {"grade": "", "label": "ungradable", "grader": "Dr B"}
    assert '<option value="ungradable" selected>' in page and 'data-testid="grader-remove"' in page
    gone = _remove(client, cookie, ids[0])
    assert gone.status_code == 303 and gone.headers["location"] == f"/images/{ids[0]}"
    assert _rows(url) == []
    assert _remove(client, cookie, ids[0]).status_code == 303
    assert _shown(client.get(f"/images/{ids[0]}", headers=cookie).text) is None
    web_events = _audits(url)

    # the same steps through the API on another photograph write the same audit events
    north_api = north.headers
    client.put(f"/v1/images/{ids[1]}/grader-grade", headers=north_api, json={"grade": 3, "grader": "Dr A"})
    client.put(f"/v1/images/{ids[1]}/grader-grade", headers=north_api, json={"grade": None, "grader": "Dr B"})
    client.delete(f"/v1/images/{ids[1]}/grader-grade", headers=north_api)
    api_events = _audits(url)[len(web_events) :]
    assert [(action, detail) for action, _, detail in web_events] == [
        ("grader_grade.record", {"grade": 3, "previous": None}),
        ("grader_grade.record", {"grade": "ungradable", "previous": 3}),
        ("grader_grade.delete", {"previous": "ungradable"}),
    ]
    assert [(a, d) for a, _, d in api_events] == [(a, d) for a, _, d in web_events]
    assert {target for _, target, _ in web_events} == {ids[0]}


def test_a_visits_page_records_beside_the_right_photograph_and_returns_to_the_visit(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
) -> None:
    north, _, _ = scored
    store = FileStore(get_settings().store_path)
    files = [("v.jpg", sample_bytes("16", "left"), "left"), ("w.jpg", sample_bytes("16", "right"), "right")]
    left, right = add_images(url, store, "P-visit", files, clinic="North", bundle=True)
    scoring.score_images([left, right], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        bundle_id = s.scalars(select(Image.bundle_id).where(Image.id == left)).one()
    cookie = web_cookie(client, north)
    visit = f"/bundles/{bundle_id}"
    page = client.get(visit, headers=cookie).text
    assert page.count('data-testid="grader-form"') == 2
    assert page.count(f'name="back" value="{visit}"') == 2

    def card(page: str, image_id: str) -> str:
        return page.split(f'data-image-id="{image_id}"', 1)[1].split('data-testid="photo"', 1)[0]

    refused = _post(
        client, cookie, "/grader-grades", {"image_id": right, "grade": "9", "grader": "KM", "back": visit}
    )
    assert refused.status_code == 422 and 'data-kind="bundle"' in refused.text
    assert 'data-testid="grader-error"' in card(refused.text, right)
    assert 'data-testid="grader-error"' not in card(refused.text, left)

    saved = _post(
        client, cookie, "/grader-grades", {"image_id": right, "grade": "1", "grader": "KM", "back": visit}
    )
    assert saved.status_code == 303 and saved.headers["location"] == f"{visit}?saved={right}#photo-{right}"
    page = client.get(visit, headers=cookie).text
    assert 'data-testid="grader-saved"' not in page  # said once, on the way back
    assert _shown(card(page, right)) == {"grade": "1", "label": "1 · Mild NPDR", "grader": "KM"}
    assert _shown(card(page, left)) is None
    removed = _post(client, cookie, "/grader-grades/remove", {"image_id": right, "back": visit})
    assert removed.headers["location"] == visit and _rows(url) == []


def test_the_recorded_grade_prints_and_the_forms_do_not(client: TestClient, scored: Scored) -> None:  # noqa: F811
    """The print stylesheet hides forms and ``.screen-only``: the box prints only with a grade in it."""
    north, _, ids = scored
    cookie = web_cookie(client, north)
    empty = client.get(f"/images/{ids[0]}", headers=cookie).text
    assert re.search(r'class="grader-box screen-only" data-testid="grader-box"', empty)
    _grade(client, cookie, ids[0], "2")
    recorded = client.get(f"/images/{ids[0]}", headers=cookie).text
    assert re.search(r'class="grader-box" data-testid="grader-box"', recorded)
    box = recorded.split('data-testid="grader-box"', 1)[1].split("</section>", 1)[0]
    shown = box.index('data-testid="grader-grade"')
    assert shown < box.index("<form")  # not inside a form, which paper leaves out
    print_rules = client.get("/static/app.css").text.split("@media print", 1)[1]
    hidden = next(line for line in print_rules.splitlines() if "display: none" in line)
    assert re.search(r"[ ,]form[ ,]", hidden) and ".screen-only" in hidden


@pytest.mark.parametrize(
    ("form", "wrong"),
    [
        ({"grade": "7", "grader": "Dr A"}, {"grade"}),
        ({"grade": "-1", "grader": "Dr A"}, {"grade"}),
        ({"grade": "2.0", "grader": "Dr A"}, {"grade"}),
        ({"grade": "two", "grader": "Dr A"}, {"grade"}),
        ({"grade": "", "grader": "Dr A"}, {"grade"}),  # an empty choice is not "ungradable"
        ({"grader": "Dr A"}, {"grade"}),
        ({"grade": "2", "grader": ""}, {"grader"}),
        ({"grade": "2", "grader": "   "}, {"grader"}),
        ({"grade": "2", "grader": "Dr\nA"}, {"grader"}),
        ({"grade": "2", "grader": "x" * 101}, {"grader"}),
        ({"grade": "2"}, {"grader"}),
        ({}, {"grade", "grader"}),
    ],
)
def test_an_invalid_form_is_shown_again_with_why_and_changes_nothing(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
    form: dict[str, str],
    wrong: set[str],
) -> None:
    north, _, ids = scored
    cookie = web_cookie(client, north)
    assert _grade(client, cookie, ids[0], "0", "Dr Z").status_code == 303  # recorded before: stays
    before_rows, before_audit = _rows(url), _audits(url)
    sent = {"image_id": ids[0], "back": f"/images/{ids[0]}", **form}
    resp = _post(client, cookie, "/grader-grades", sent)
    assert resp.status_code == 422, resp.text
    assert _rows(url) == before_rows and _audits(url) == before_audit
    error = re.search(r'data-testid="grader-error">([^<]+)<', resp.text)
    assert error, resp.text
    said = html.unescape(error.group(1))
    assert said.endswith("Nothing was saved.")
    assert ("Choose the grader's grade" in said) is ("grade" in wrong)
    assert ("Give the grader's name" in said) is ("grader" in wrong)
    # the result page again, its form holding what was sent; it does not poll (the script's
    # reload would send the form again)
    assert 'data-testid="result"' in resp.text and "data-progress-url" not in resp.text
    assert f'name="grader" value="{html.escape(form.get("grader", ""))}"' in resp.text


def test_a_form_naming_no_photograph_is_refused(client: TestClient, url: str, scored: Scored) -> None:  # noqa: F811
    north, _, _ = scored
    cookie = web_cookie(client, north)
    for path, form in (("/grader-grades", {"grade": "2", "grader": "Dr A"}), ("/grader-grades/remove", {})):
        resp = _post(client, cookie, path, form)
        assert resp.status_code == 422 and "named no photograph" in resp.text, path
    assert _rows(url) == [] and _audits(url) == []


def test_another_clinics_photograph_is_not_found_and_stays_as_it_was(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
) -> None:
    north, south, ids = scored
    assert _grade(client, web_cookie(client, north), ids[0], "1").status_code == 303
    before_rows, before_audit = _rows(url), _audits(url)
    south_cookie = web_cookie(client, south)
    for resp in (
        _grade(client, south_cookie, ids[0], "4", "Dr Z"),
        _remove(client, south_cookie, ids[0]),
        _grade(client, south_cookie, "0" * 32, "4", "Dr Z"),
    ):
        assert resp.status_code == 404 and "No such photograph" in resp.text
    assert _rows(url) == before_rows and _audits(url) == before_audit
    # South's agreement page knows nothing of North's grades
    assert "No grader's grades recorded yet" in client.get("/agreement", headers=south_cookie).text


def test_signed_out_or_from_another_site_nothing_is_recorded(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
) -> None:
    from services.web import SIGNED_IN_FORMS

    # the edge sends signed-out posts to the login page before reading their body
    assert {"/grader-grades", "/grader-grades/remove"} <= SIGNED_IN_FORMS
    north, _, ids = scored
    ended = web_cookie(client, north)
    assert client.post("/logout", headers=ended, follow_redirects=False).status_code == 303
    client.cookies.clear()
    for cookie in ({}, ended):
        for resp in (_grade(client, cookie, ids[0], "2"), _remove(client, cookie, ids[0])):
            assert resp.status_code == 303 and resp.headers["location"].startswith("/login")
    assert client.get("/agreement", follow_redirects=False).headers["location"] == "/login?next=/agreement"
    cookie = web_cookie(client, north)
    foreign = _grade(client, cookie | {"Origin": "https://elsewhere.example"}, ids[0], "2")
    assert foreign.status_code == 403
    assert _rows(url) == [] and _audits(url) == []
    # a form of a few fields: the small forms' body limit applies
    big = client.post("/grader-grades", headers=cookie, data={"grader": "x" * 70_000}, follow_redirects=False)
    assert big.status_code == 413 and _rows(url) == []


@pytest.mark.parametrize(
    "back",
    [
        "https://elsewhere.example/images/{id}",
        "//elsewhere.example/images/{id}",
        "/images/{id}/../../patients",
        "/patients",
        "/images/{other}",  # a result page, but of another photograph
        "/bundles/{other}",  # a visit the photograph is not part of
        "",
    ],
)
def test_only_the_photographs_own_result_pages_are_returned_to(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
    back: str,
) -> None:
    north, _, ids = scored
    cookie = web_cookie(client, north)
    target = back.format(id=ids[0], other=ids[1])
    for path, form in (
        ("/grader-grades", {"image_id": ids[0], "grade": "2", "grader": "Dr A", "back": target}),
        ("/grader-grades/remove", {"image_id": ids[0], "back": target}),
    ):
        resp = _post(client, cookie, path, form)
        page = resp.headers["location"].partition("?")[0]  # saving adds ?saved=...#photo-...
        assert resp.status_code == 303 and page == f"/images/{ids[0]}", (path, target)
    assert _rows(url) == []  # recorded, then removed: the target changed only where to go


# -------------------------------------------------------------------------------- the agreement


def test_the_agreement_page_shows_the_apis_figures_and_links_the_missed_photographs(
    client: TestClient,
    scored: Scored,  # noqa: F811
) -> None:
    north, _, ids = scored
    cookie = web_cookie(client, north)
    home = client.get("/", headers=cookie).text
    assert '<a href="/grading-queue">To grade</a>\n    <a href="/agreement">Agreement</a>' in home
    empty = client.get("/agreement", headers=cookie)
    assert empty.status_code == 200 and "No grader's grades recorded yet" in empty.text
    assert "Grader's grade" in empty.text and 'data-testid="confusion-matrix"' not in empty.text

    model = {i: client.get(f"/v1/images/{i}", headers=north.headers).json() for i in ids}
    # the grader refers every photograph the model did not (missed), agrees with the others, and
    # cannot grade the last
    for image_id in ids[:2]:
        grade = "4" if not model[image_id]["referable"] else str(model[image_id]["grade"])
        assert _grade(client, cookie, image_id, grade).status_code == 303
    assert _grade(client, cookie, ids[2], "ungradable").status_code == 303
    api = client.get("/v1/agreement", headers=north.headers).json()
    page = client.get("/agreement", headers=cookie).text
    assert "No grader's grades recorded yet" not in page

    def value(testid: str) -> str:
        found = re.search(rf'data-testid="{testid}" data-value="([^"]*)"', page)
        assert found, testid
        return found.group(1)

    def raw(x: object) -> str:
        return "" if x is None else str(x)

    assert 'data-model=""' in page and api["model_version"] is None  # each photograph's own grade
    for ref in api["releases"]:
        assert f'<code data-testid="agreement-release">{ref}</code>' in page
    assert value("n-images") == str(api["n_images"]) == "3"
    assert value("n-both") == str(api["n_both_gradable"])
    assert value("qwk") == raw(api["qwk"]) and value("exact") == raw(api["exact_agreement"])
    referable = api["referable"]
    assert value("sensitivity") == raw(referable["sensitivity"])
    assert value("specificity") == raw(referable["specificity"])
    for name in ("sensitivity", "specificity"):
        shown = re.search(rf'data-testid="{name}-ci">([^<]*)<', page)
        assert shown and shown.group(1) == present.interval_text(referable[f"{name}_ci95"])
    assert present.share_text(referable["sensitivity"]) in page
    estimated = api["estimated"]
    assert estimated is not None  # corrected for verification bias: shown as the API gives it
    assert value("estimated-sensitivity") == raw(estimated["sensitivity"])
    assert value("estimated-specificity") == raw(estimated["specificity"])
    cells = dict(re.findall(r'data-cell="(\d-\d)"[^>]*>(\d+)<', page))
    assert len(cells) == 25
    assert {k: int(v) for k, v in cells.items()} == {
        f"{i}-{j}": n for i, row in enumerate(api["confusion_matrix"]) for j, n in enumerate(row)
    }
    for row, count in api["ungradable"].items():
        assert re.search(rf'data-row="{row}"><td>[^<]*</td><td class="num">{count}<', page), row
    missed = [i for i in ids[:2] if not model[i]["referable"]]
    assert missed and api["missed_referable"] == missed  # the stand-in grades ids[0] 0: not referred
    assert re.findall(r'<a href="/images/([0-9a-f]{32})">', page) == missed
    assert "the 95% intervals say how much" in page


# ------------------------------------------------------------------ the blind grading pages


def test_the_grading_queue_page_lists_what_waits_and_the_grade_page_is_blind(
    client: TestClient,
    url: str,
    scored: Scored,  # noqa: F811
) -> None:
    north, south, ids = scored  # the stand-in referred ids[1] and ids[2], not ids[0]
    settings = client.app.state.settings  # type: ignore[attr-defined]
    client.app.state.settings = settings.model_copy(update={"grader_sample_percent": 100})  # type: ignore[attr-defined]
    cookie = web_cookie(client, north)
    page = client.get("/grading-queue", headers=cookie)
    assert page.status_code == 200
    listed = re.findall(r'data-testid="queue-item" data-image="([0-9a-f]+)"', page.text)
    api = client.get("/v1/grading-queue", headers=north.headers).json()
    assert listed == [item["image_id"] for item in api["items"]] == ids
    assert "/grade/" + ids[0] in page.text

    blind = client.get(f"/grade/{ids[0]}", headers=cookie)
    assert blind.status_code == 200 and f"/images/{ids[0]}/photo" in blind.text
    assert 'data-testid="photo-grade"' not in blind.text and 'data-testid="verdict"' not in blind.text
    main = blind.text[blind.text.index("<main") : blind.text.index("</main>")].lower()
    for said in ("verdict", "photo-grade", "probab", "badge-refer", "badge-ok", "no referral", "heatmap"):
        assert said not in main, said  # nothing says what the service decided
    # a refused form shows the blind page again, not the result page
    refused = _post(
        client,
        cookie,
        "/grader-grades",
        {"image_id": ids[0], "grade": "7", "grader": "Dr A", "back": "/grading-queue"},
    )
    assert refused.status_code == 422 and 'data-testid="grader-error"' in refused.text
    assert 'data-testid="photo-grade"' not in refused.text and _rows(url) == []
    saved = _post(
        client,
        cookie,
        "/grader-grades",
        {"image_id": ids[0], "grade": "3", "grader": "Dr A", "back": "/grading-queue"},
    )
    assert saved.status_code == 303 and saved.headers["location"] == "/grading-queue"
    assert _rows(url) == [(ids[0], 3, True, "Dr A")]
    after = client.get("/grading-queue", headers=cookie).text
    assert re.findall(r'data-testid="queue-item" data-image="([0-9a-f]+)"', after) == ids[1:]

    other = web_cookie(client, south)
    assert client.get(f"/grade/{ids[1]}", headers=other).status_code == 404
    assert 'data-testid="queue-empty"' in client.get("/grading-queue", headers=other).text
    signed_out = client.get(f"/grade/{ids[1]}", follow_redirects=False)
    assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/login")
