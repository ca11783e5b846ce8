"""A grader's "refer" reaches the referral surfaces (session 32): a grader's referable or
ungradable grade of a photograph of the patient's latest visit puts the patient on the home page's
"Patients to refer", the patient and result pages (a "REFER (grader)" banner), the patient JSON
and a job's patient rows (``grader_refers``), beside the model's decision, which stays as it is.
Before, a grader's grade changed nothing a clinician reads: only the agreement and ``/metrics``
named the miss. On SQLite with the worker's own scoring code and stub releases;
tests/integration/test_grader_referral_pg.py runs it with a real worker on PostgreSQL."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, utcnow
from tests.api_support import Key, make_key, web_cookie
from tests.grader_referral_support import surfaces
from tests.unit.test_job_reads import statements
from tests.unit.test_referral_stands import OLD, grade
from tests.unit.test_workers_folders import make_folder
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images, photo
from workers import folders, scoring


def _clean_patient(
    url: str, store: FileStore, name: str, files: tuple[str, ...] = ("16_left.jpg", "16_right.jpg")
) -> dict[str, str]:
    """``name`` graded 0 in both eyes by the release: no referral. Returns ids by eye."""
    made = [photo(f) for f in files]
    ids = add_images(url, store, name, made)
    grade(ids, OLD, 0, store, url)
    return {f[2]: i for f, i in zip(made, ids, strict=True)}


def _put(client: TestClient, key: Key, image_id: str, value: int | None, grader: str = "Dr A") -> None:
    answer = client.put(
        f"/v1/images/{image_id}/grader-grade", json={"grade": value, "grader": grader}, headers=key.headers
    )
    assert answer.status_code == 200, answer.text


def test_a_graders_refer_lists_the_patient_and_a_later_grade_withdraws_it(
    url: str, client: TestClient
) -> None:
    store = FileStore(get_settings().store_path)
    ids = _clean_patient(url, store, "P1")
    key = make_key(url, "North")
    page = f"/images/{ids['left']}"
    model = surfaces(client, key, "P1", page)
    assert model["referable"] is False and not model["home_lists"] and model["web"] == "No referral"

    _put(client, key, ids["left"], 3)
    refer = surfaces(client, key, "P1", page)
    # before the fix: referable false with no other field, not on the home page, "No referral"
    # on the patient page and the photograph's page
    assert (refer["home_lists"], refer["web"], refer["page"]) == (True, "REFER (grader)", "REFER (grader)"), (
        refer
    )
    assert refer["grader_refers"] is True and (refer["referable"], refer["grade"]) == (False, 0)
    assert refer["home_grader"]
    assert (
        "a grader (Dr A) graded the left eye&#39;s photograph 3 · Severe NPDR (referable)"
        in refer["web_banner"]
    )
    assert "not the model&#39;s" in refer["page_banner"]
    [only] = refer["grader_referrals"]
    assert (only["image_id"], only["eye"], only["grade"], only["gradable"], only["grader"]) == (
        ids["left"], "left", 3, True, "Dr A",
    )  # fmt: skip

    _put(client, key, ids["left"], 1, "Dr B")  # the latest grade of the photograph counts
    withdrawn = surfaces(client, key, "P1", page)
    assert withdrawn["grader_refers"] is False and withdrawn["grader_referrals"] == []
    assert not withdrawn["home_lists"]
    assert withdrawn["web"] == withdrawn["page"] == "No referral"

    _put(client, key, ids["right"], None)  # ungradable to the grader: refer, as clinics treat it
    ungradable = surfaces(client, key, "P1")
    assert ungradable["grader_refers"] and ungradable["home_lists"] and ungradable["web"] == "REFER (grader)"
    assert "graded the right eye&#39;s photograph ungradable" in ungradable["web_banner"]

    removed = client.delete(f"/v1/images/{ids['right']}/grader-grade", headers=key.headers)
    assert removed.status_code == 204
    gone = surfaces(client, key, "P1")
    assert not gone["grader_refers"] and not gone["home_lists"] and gone["web"] == "No referral"


def test_a_patient_the_model_refers_too_is_listed_once_with_both(url: str, client: TestClient) -> None:
    store = FileStore(get_settings().store_path)
    made = [photo("16_left.jpg"), photo("16_right.jpg")]
    ids = add_images(url, store, "P1", made)
    grade(ids, OLD, 4, store, url)
    key = make_key(url, "North")
    _put(client, key, ids[0], 4)
    both = surfaces(client, key, "P1")
    assert both["referable"] and both["grader_refers"] and both["web"] == "REFER"  # the model's banner
    assert "Also: a grader (Dr A) graded the left eye" in both["web_banner"]
    home = client.get("/", headers=web_cookie(client, key)).text
    assert home.count(">P1<") == 1 and "Also: a grader (Dr A)" in home


def test_only_the_latest_visit_counts(url: str, client: TestClient) -> None:
    """A grader grading a photograph of an earlier visit reviews that visit: today's patient is
    decided by today's photographs, as the model's decision is."""
    store = FileStore(get_settings().store_path)
    earlier = _clean_patient(url, store, "P1")
    with session_scope(url) as s:
        s.execute(update(Image).values(created_at=utcnow() - timedelta(days=60)))
    _clean_patient(url, store, "P1", ("17_left.jpg", "17_right.jpg"))
    key = make_key(url, "North")
    _put(client, key, earlier["left"], 4)
    now = surfaces(client, key, "P1")
    assert not now["grader_refers"] and not now["home_lists"] and now["web"] == "No referral"
    # the earlier visit's page shows that visit as recorded, with the grader's grade beside it
    page = client.get(f"/images/{earlier['left']}", headers=web_cookie(client, key)).text
    assert 'data-testid="earlier-visit"' in page and 'data-testid="grader-grade" data-grade="4"' in page


def test_another_clinics_grader_referrals_are_not_listed(url: str, client: TestClient) -> None:
    store = FileStore(get_settings().store_path)
    north, south = make_key(url, "North"), make_key(url, "South")
    made = [photo("16_left.jpg"), photo("16_right.jpg")]
    ids = add_images(url, store, "PS", made, clinic="South")
    grade(ids, OLD, 0, store, url)
    _put(client, south, ids[0], 2)
    assert ">PS<" in client.get("/", headers=web_cookie(client, south)).text
    assert ">PS<" not in client.get("/", headers=web_cookie(client, north)).text


def test_the_home_page_reads_the_same_statements_for_three_grader_referrals_as_for_six(
    url: str, client: TestClient
) -> None:
    """No statement per patient: the graders' referrals and their patients' photographs are read
    in one statement each."""
    store = FileStore(get_settings().store_path)
    key = make_key(url, "North")
    cookie = web_cookie(client, key)

    def referred(names: list[str]) -> None:
        for name in names:
            _put(client, key, _clean_patient(url, store, name)["left"], 2)

    def home() -> tuple[int, str]:
        with statements(url) as seen:
            html = client.get("/", headers=cookie).text
        return len(seen), html

    referred(["A1", "A2", "A3"])
    three, _ = home()
    referred(["B1", "B2", "B3"])
    six, html = home()
    assert six == three, (three, six)
    assert html.count('data-testid="grader-refers"') == 6


def test_a_jobs_patient_rows_carry_the_graders_referral(url: str, roots: Path, client: Any) -> None:
    store = FileStore(get_settings().store_path)
    key = make_key(url, "North")
    created = client.post("/v1/jobs", headers=key.headers, json={"folder": str(make_folder(roots))})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    sent = Sent()
    folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent, chunk=4)
    for _, args, _ in sent:
        scoring.score_images(
            args[0], explain=False, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent()
        )
    rows = client.get(f"/v1/jobs/{job_id}/patients", headers=key.headers).json()["items"]
    assert {r["grader_refers"] for r in rows} == {False}
    results = client.get(f"/v1/jobs/{job_id}/results", headers=key.headers).json()["items"]
    graded = next(r for r in results if r["patient_id"] == "16" and r["image_id"])
    _put(client, key, graded["image_id"], 4)

    by_id = {
        r["patient_id"]: r
        for r in client.get(f"/v1/jobs/{job_id}/patients", headers=key.headers).json()["items"]
    }
    # before the fix: no such field; the grader's referral was on no list of the job
    assert by_id["16"]["grader_refers"] is True and by_id["16"]["grader_referrals"][0]["grade"] == 4
    assert [p for p, r in by_id.items() if r["grader_refers"]] == ["16"]
    answer = client.get(f"/v1/jobs/{job_id}/patients?format=csv", headers=key.headers)
    table = list(csv.DictReader(answer.text.splitlines()))
    assert {r["patient_id"]: r["grader_refers"] for r in table} == {
        p: "true" if p == "16" else "false" for p in by_id
    }
    assert list(table[0])[-1] == "grader_refers"  # an addition: the earlier columns keep their places
