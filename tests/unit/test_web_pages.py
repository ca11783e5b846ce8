"""Result pages of the web interface against the API's patient result (embedded SQLite, scoring
done in-process by tests/unit/test_workers_scoring.py's stub ensemble)."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select, update

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, WebSession, utcnow
from tests.api_support import make_key, web_cookie
from tests.unit.test_workers_scoring import BUNDLE, Sent, StubEnsemble, add_images, job_with_photo, photo
from workers import scoring


def _banner(html: str) -> tuple[str, str]:
    tone = re.search(r'data-testid="verdict"[^>]*data-tone="([a-z]+)"', html)
    headline = re.search(r'data-testid="verdict-headline"[^>]*>([^<]+)<', html)
    assert tone and headline, html[:2000]
    return tone.group(1), headline.group(1).strip()


def test_a_single_photographs_page_gives_the_patients_decision(client: TestClient, url: str) -> None:
    """The web walkthrough: one normal left photograph uploaded alone showed a green "No referral"
    while the API said refer (the right eye never photographed)."""
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    [image_id] = add_images(url, store, "P178", [photo("16_left.jpg")])
    scoring.score_images([image_id], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    patient = client.get("/v1/patients/P178", headers=key.headers).json()
    assert patient["referable"] is True and "right_eye_not_photographed" in patient["referral_reasons"]
    html = client.get(f"/images/{image_id}", headers=web_cookie(client, key)).text
    tone, headline = _banner(html)
    assert tone == "refer" and headline.startswith("REFER"), headline
    assert "Right eye: not photographed" in html
    # the eye itself says so (its badge read "UNGRADABLE": the review of the printed page)
    assert re.search(r'data-testid="eye-right-grade"[^>]*>NOT PHOTOGRAPHED<', html)
    assert re.search(r'data-testid="eye-left-grade"[^>]*data-grade="', html)
    assert re.search(r'data-testid="received">received \d{4}-\d\d-\d\d \d\d:\d\d UTC<', html)
    # printed: the patient named beside each eye (a long visit prints on several pages)
    assert html.count('<span class="print-only-inline muted"> · patient P178</span>') == 2
    assert 'data-testid="print"' in html


def test_an_unfinished_result_offers_no_print(client: TestClient, url: str) -> None:
    """The review: "Print" on a result still being scored printed the "Scoring…" banner."""
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    [image_id] = add_images(url, store, "PQ", [photo("16_left.jpg")])  # queued
    html = client.get(f"/images/{image_id}", headers=web_cookie(client, key)).text
    assert _banner(html)[0] == "pending" and 'data-testid="print"' not in html


def test_the_patient_page_says_pending_and_not_photographed_in_words(client: TestClient, url: str) -> None:
    """The web walkthrough: a right-eye photograph still queued read as a red REFER with the right
    eye "UNGRADABLE"; an eye never photographed read "UNGRADABLE" too."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    store = FileStore(get_settings().store_path)
    [left] = add_images(url, store, "PONE", [photo("16_left.jpg")])
    scoring.score_images([left], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    html = client.post("/patients", headers=cookie, data={"patient_id": "PONE"}).text
    assert _banner(html)[0] == "refer"
    assert "not photographed in this screening" in html and "UNGRADABLE" not in html
    # the patient's grade is the graded eye's: said so (a bare "grade 0" read as a healthy patient)
    assert re.search(
        r'data-testid="patient-grade"[^>]*>[^<]*\(graded eye only; right eye not photographed\)', html
    )

    add_images(url, store, "PONE", [photo("16_right.jpg")])  # queued
    assert (
        "right_eye_pending" in client.get("/v1/patients/PONE", headers=key.headers).json()["referral_reasons"]
    )
    html = client.post("/patients", headers=cookie, data={"patient_id": "PONE"}).text
    assert _banner(html) == ("pending", "Scoring…")
    assert "being scored" in html and "UNGRADABLE" not in html

    add_images(url, store, "PNEW", [photo("17_left.jpg")])  # nothing graded yet
    html = client.post("/patients", headers=cookie, data={"patient_id": "PNEW"}).text
    assert _banner(html)[0] == "pending"


def test_signing_in_again_after_a_form_post_returns_to_its_form(client: TestClient, url: str) -> None:
    """The web walkthrough: a session lapsed mid-upload sent the sign-in back to the POST-only
    route (a JSON 405); and signing out was the one form post another site could send."""
    for route, form in (("/screenings/image", "/"), ("/patients/erase", "/patients"), ("/jobs", "/jobs")):
        resp = client.post(route, data={}, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == (
            "/login?unsaved=1" if form == "/" else f"/login?next={form}&unsaved=1"
        ), route
    # the page the form was on, when the browser names it on this host (a grader's grade saved
    # after the session ended went back to the home page: session 26's leftover); never elsewhere
    for referer, back in (
        ("http://testserver/images/abc", "/login?next=/images/abc&unsaved=1"),
        ("http://testserver/grade/abc?x=1&y=2", "/login?next=/grade/abc%3Fx%3D1%26y%3D2&unsaved=1"),
        ("https://elsewhere.example/images/abc", "/login?unsaved=1"),
        ("http://testserver//elsewhere.example/x", "/login?unsaved=1"),
        ("http://testserver/login?next=/jobs", "/login?unsaved=1"),
    ):
        resp = client.post("/grader-grades", data={}, headers={"Referer": referer}, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == back, referer
    # the sign-in page says the post was not saved (staff took the redirect for a saved upload)
    page = client.get("/login?next=/jobs&unsaved=1").text
    assert 'data-testid="unsaved"' in page and "not saved" in page
    assert 'data-testid="unsaved"' not in client.get("/login?next=/jobs").text
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    foreign = client.post(
        "/logout", headers=cookie | {"Origin": "https://elsewhere.example"}, follow_redirects=False
    )
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    assert client.post("/logout", headers=cookie, follow_redirects=False).status_code == 303


def test_a_refused_upload_keeps_the_form_and_says_why_in_words(client: TestClient, url: str) -> None:
    """The web walkthrough: a refused upload emptied the patient id and said "left_1: JPEG does not
    end with the EOI marker (FFD9)"."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    jpeg = photo("16_left.jpg")[1]
    resp = client.post(
        "/screenings/bundle",
        headers=cookie,
        data={"patient_id": "P229"},
        files={"left_1": ("l.jpg", jpeg[:5000])},
    )
    assert resp.status_code == 422
    assert "Left eye, photograph 1: the file is incomplete" in resp.text and "FFD9" not in resp.text
    assert 'id="bundle-patient"' in resp.text and 'value="P229"' in resp.text
    resp = client.post(
        "/screenings/image",
        headers=cookie,
        data={"patient_id": "P230", "eye": "right"},
        files={"file": ("x.jpg", b"patient notes\n" * 40)},
    )
    assert resp.status_code == 422 and "Photograph: the file is not a photograph" in resp.text
    assert 'value="P230"' in resp.text and 'value="right" checked' in resp.text


def test_an_earlier_visits_pages_show_that_visits_result(client: TestClient, url: str) -> None:
    """A leftover of the web walkthrough: a visit's page of last year showed today's result as its
    own (here: today only the left eye, so "right eye not photographed, REFER")."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    store = FileStore(get_settings().store_path)
    first = add_images(url, store, "PVISITS", [photo(n) for n in BUNDLE], bundle=True)
    scoring.score_images(first, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        bundle_id = s.get(Image, first[0]).bundle_id
        s.execute(update(Image).where(Image.id.in_(first)).values(created_at=utcnow() - timedelta(days=400)))
    then = client.get("/v1/patients/PVISITS", headers=key.headers).json()
    assert then["referral_reasons"] == [] or "right_eye_not_photographed" not in then["referral_reasons"]

    [today] = add_images(url, store, "PVISITS", [photo("19_left.jpg")])
    scoring.score_images([today], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    now = client.get("/v1/patients/PVISITS", headers=key.headers).json()
    assert "right_eye_not_photographed" in now["referral_reasons"]

    for page in (f"/bundles/{bundle_id}", f"/images/{first[2]}"):
        html = client.get(page, headers=cookie).text
        assert 'data-testid="earlier-visit"' in html, page
        assert "not photographed" not in html, page
        assert _banner(html) == _banner_of(then), page
    html = client.get(f"/images/{today}", headers=cookie).text
    assert 'data-testid="earlier-visit"' not in html and "Right eye: not photographed" in html


def _banner_of(patient: dict[str, object]) -> tuple[str, str]:
    """The verdict banner a patient result (the API's JSON) gives."""
    if not patient["gradable"]:
        return "refer", "REFER — UNGRADABLE"
    return ("refer", "REFER") if patient["referable"] else ("ok", "No referral")


def test_the_jobs_page_says_why_files_failed(client: TestClient, url: str) -> None:
    """A leftover of the web walkthrough: the jobs page said "2 failed" and nothing more (the
    reasons were only in the CSV)."""
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    [image_id] = add_images(url, store, "PJOB", [photo("16_left.jpg")])
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        job = repo.create_job(s, clinic.id, "/imports/north/monday")
        repo.add_job_items(
            s,
            job.id,
            [
                repo.JobItemSpec("broken.jpg", "PJOB", "left"),
                repo.JobItemSpec("16_left.jpg", "PJOB", "left"),
            ],
        )
        broken, linked = repo.job_items(s, job.id)
        repo.set_job_item(s, broken, status="failed", error="JPEG does not end with the EOI marker (FFD9)")
        repo.set_job_item(s, linked, status="queued", image_id=image_id)
        repo.mark_image_failed(s, s.get(Image, image_id), "could not be scored after 3 attempts")
        repo.refresh_job_counts(s, job.id)
    html = client.get("/jobs", headers=web_cookie(client, key)).text
    failures = re.search(r'data-testid="job-failures".*?</details>', html, re.S)
    assert failures, html
    assert "<code>broken.jpg</code>: JPEG does not end with the EOI marker (FFD9)" in failures.group(0)
    assert "<code>16_left.jpg</code>: could not be scored after 3 attempts" in failures.group(0)


def test_a_finished_jobs_rows_keep_their_grade_while_a_newer_release_regrades(
    client: TestClient, url: str
) -> None:
    """Session 22's leftover: a finished job's counts kept a re-queued photograph's earlier grade,
    but its rows (JSON and CSV) read "queued" with no grade."""
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    job_id, image_id = job_with_photo(url, store, "PREG", "16_left.jpg")
    scoring.score_images([image_id], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    before = client.get(f"/v1/jobs/{job_id}/results", headers=key.headers).json()["items"]
    assert before[0]["status"] == "done" and before[0]["grade"] is not None
    with session_scope(url) as s:
        assert repo.refresh_job_counts(s, job_id).status == "done"
        repo.requeue_image(s, s.get(Image, image_id))  # as a newer release does
    rows = client.get(f"/v1/jobs/{job_id}/results", headers=key.headers).json()["items"]
    assert (rows[0]["status"], rows[0]["grade"]) == ("done", before[0]["grade"])
    csv_text = client.get(f"/v1/jobs/{job_id}/results?format=csv", headers=key.headers).text
    assert ",queued," not in csv_text and ",done," in csv_text
    assert client.get(f"/v1/images/{image_id}", headers=key.headers).json()["status"] == "queued"


def test_the_history_keeps_an_earlier_releases_result_after_a_regrade(client: TestClient, url: str) -> None:
    """Session 23's leftover: a newer release grading a visit again recomputed it under the same
    trigger, and the history's one-entry-per-screening rule hid what the clinic was first told."""
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")
    ids = add_images(url, store, "PHIST", [photo(n) for n in BUNDLE], bundle=True)
    scoring.score_images(ids[:2], ensemble=old, store=store, db_url=url, enqueue=Sent())
    scoring.score_images(ids[2:], ensemble=old, store=store, db_url=url, enqueue=Sent())
    history = client.get("/v1/patients/PHIST", headers=key.headers).json()["history"]
    assert [h["model_version"] for h in history] == [old.ref]  # two partial results: one screening
    with session_scope(url) as s:  # a worker of the newer release queues the visit again
        for image in repo.get_images(s, ids):
            repo.requeue_image(s, image)
    regraded = scoring.score_images(ids, ensemble=new, store=store, db_url=url, enqueue=Sent())
    assert sorted(regraded.scored + regraded.ungradable) == sorted(ids)
    history = client.get("/v1/patients/PHIST", headers=key.headers).json()["history"]
    assert [h["model_version"] for h in history] == [new.ref, old.ref]


def test_an_unknown_page_address_answers_a_page_to_browsers_and_json_to_clients(
    client: TestClient, url: str
) -> None:
    """A leftover of the web walkthrough: a mistyped or stale address gave a browser raw JSON."""
    page = client.get("/patient", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "There is no such page" in page.text and "Back to screening" in page.text
    api = client.get("/v1/nothing-here", headers={"Accept": "text/html"})
    assert api.status_code == 404 and api.json()["error"] == "not_found"
    plain = client.get("/patient")
    assert plain.status_code == 404 and plain.json()["error"] == "not_found"
    key = make_key(url, "North")  # signed in: the page keeps the signed-in header
    page = client.get("/patient", headers={"Accept": "text/html"} | web_cookie(client, key))
    assert page.status_code == 404 and "Sign out" in page.text


def test_a_tiff_the_upload_accepted_can_be_viewed(client: TestClient, url: str, tmp_path: Path) -> None:
    """The security review: a TIFF of 41-50 M pixels passed the upload's limit (50 M) and its
    photograph page answered 500 (the converter kept the decoder's own 40 M)."""
    key = make_key(url, "North")
    big = tmp_path / "big.tif"
    PILImage.new("RGB", (6500, 6500), (90, 40, 20)).save(big, compression="tiff_deflate")
    answer = client.post(
        "/v1/images",
        headers=key.headers,
        data={"patient_id": "PTIFF", "eye": "left"},
        files={"file": ("big.tif", big.read_bytes(), "image/tiff")},
    )
    assert answer.status_code == 202, answer.text
    shown = client.get(f"/images/{answer.json()['id']}/photo", headers=web_cookie(client, key))
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"


def test_a_12_bit_png_is_shown_as_it_is_graded(client: TestClient, url: str) -> None:
    """Session 32: 12-bit data stored unscaled in a 16-bit PNG is graded as the photograph; the
    page served the file itself, which a browser (ignoring its depth) shows nearly black."""
    import cv2
    import numpy as np

    from ml.imageio import decode_image

    key = make_key(url, "North")
    rgb = decode_image(photo("16_left.jpg")[1])
    twelve = np.rint(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
    data = cv2.imencode(".png", twelve[..., ::-1])[1].tobytes()
    answer = client.post(
        "/v1/images",
        headers=key.headers,
        data={"patient_id": "P12", "eye": "left"},
        files={"file": ("deep.png", data, "image/png")},
    )
    assert answer.status_code == 202, answer.text
    shown = client.get(f"/images/{answer.json()['id']}/photo", headers=web_cookie(client, key))
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert shown.content != data
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(shown.content)).convert("RGB")), rgb)


def test_a_sign_in_is_a_session_that_ends_on_sign_out_idle_age_and_revocation(
    client: TestClient, url: str
) -> None:
    """The security review: the web cookie was the clinic's API key itself, so signing out only
    cleared the browser's copy and a copied cookie worked until an operator revoked the key."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    assert key.key not in cookie["Cookie"]

    def signed_in(headers: dict[str, str]) -> bool:
        page = client.get("/jobs", headers=headers, follow_redirects=False)
        assert page.status_code in (200, 303), page.status_code
        return page.status_code == 200

    assert signed_in(cookie)
    out = client.post("/logout", headers=cookie, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert not signed_in(cookie)  # the copied cookie no longer works

    for column in ("last_seen_at", "created_at"):  # idle for 9 h; or begun 25 h ago
        cookie = web_cookie(client, key)
        with session_scope(url) as s:
            s.execute(
                update(WebSession).values(
                    {column: utcnow() - timedelta(hours={"last_seen_at": 9, "created_at": 25}[column])}
                )
            )
        assert not signed_in(cookie), column
        with session_scope(url) as s:
            assert s.scalar(select(func.count()).select_from(WebSession)) == 0

    cookie = web_cookie(client, key)
    assert signed_in(cookie)
    with session_scope(url) as s:
        assert repo.revoke_api_key(s, key.key_id, record=False) == 1
    assert not signed_in(cookie)


def test_signing_in_again_ends_the_previous_session_and_drops_the_old_key_cookie(
    client: TestClient, url: str
) -> None:
    """The review: a second sign-in left the first session working beside it, and browsers kept
    the cookie of the versions before sessions (``drscreen_key``: the API key itself)."""
    key = make_key(url, "North")
    first = web_cookie(client, key)
    again = client.post(
        "/login",
        headers={"Cookie": f"{first['Cookie']}; drscreen_key={key.key}"},
        data={"api_key": key.key},
        follow_redirects=False,
    )
    assert again.status_code == 303
    cleared = [h for h in again.headers.get_list("set-cookie") if h.startswith("drscreen_key=")]
    assert cleared and ("Max-Age=0" in cleared[0] or "expires=" in cleared[0].lower())
    client.cookies.clear()
    assert client.get("/jobs", headers=first, follow_redirects=False).status_code == 303  # ended

    # sessions that can no longer be used are deleted at the next sign-in
    with session_scope(url) as s:
        s.execute(update(WebSession).values(last_seen_at=utcnow() - timedelta(hours=9)))
    web_cookie(client, key)
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(WebSession)) == 1


def test_an_unknown_page_spends_no_rate_limit_and_never_fails(client: TestClient, url: str) -> None:
    """The review: the 404 page looked the signed-in key up through the API's rate limit; over it,
    an unknown address answered 500 (and each one used a token)."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)

    class Exhausted:
        def acquire(self, key_id: int) -> float:
            return 30.0

    client.app.state.rate_limiter = Exhausted()  # type: ignore[attr-defined]
    page = client.get("/no-such-page", headers={"Accept": "text/html"} | cookie)
    assert page.status_code == 404 and "Sign out" in page.text


def test_the_api_edge_holds_under_a_root_path(url: str) -> None:
    """The review: behind a root path (``uvicorn --root-path``, a mount) ``scope["path"]`` starts
    with it, and the keyless-write refusal and ``no-store`` did not apply."""
    from services.app import create_app

    key = make_key(url, "North")
    with TestClient(create_app(), root_path="/drs") as mounted:
        keyless = mounted.post("/drs/v1/images", data={"patient_id": "p", "eye": "left"})
        assert keyless.status_code == 401 and keyless.json()["error"] == "unauthorized"
        assert mounted.get("/drs/v1/models", headers=key.headers).headers["cache-control"] == "no-store"


def test_signing_in_from_a_form_posted_signed_out_lands_on_its_page(client: TestClient, url: str) -> None:
    key = make_key(url, "North")
    sent = client.post(
        "/grader-grades",
        data={},
        headers={"Referer": "http://testserver/grade/abc?x=1&y=2"},
        follow_redirects=False,
    )
    login = client.get(sent.headers["location"])
    assert login.status_code == 200 and 'value="/grade/abc?x=1&amp;y=2"' in login.text
    signed = client.post(
        "/login", data={"api_key": key.key, "next": "/grade/abc?x=1&y=2"}, follow_redirects=False
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/grade/abc?x=1&y=2"


def test_the_home_page_lists_the_patients_to_refer(client: TestClient, url: str) -> None:
    """The clinician's review (session 29): the home page listed visits only, with no decision;
    patients referred after a single photograph or a folder job were on no list at all."""
    from core.tables import PatientResult
    from tests.unit.test_patient_summary import GradeStub

    store = FileStore(get_settings().store_path)
    for patient, grade in (("PREF3", 3), ("PFINE", 0)):
        ids = add_images(url, store, patient, [photo("16_left.jpg"), photo("16_right.jpg")])
        scoring.score_images(ids, ensemble=GradeStub(grade=grade), store=store, db_url=url, enqueue=Sent())
    other = make_key(url, "South")  # another clinic's referable patient is not listed
    ids = add_images(url, store, "PSOUTH", [photo("17_left.jpg")], clinic="South")
    scoring.score_images(ids, ensemble=GradeStub(grade=4), store=store, db_url=url, enqueue=Sent())
    key = make_key(url, "North")
    html = client.get("/", headers=web_cookie(client, key)).text
    table = html.split('data-testid="to-refer"', 1)[1].split("</table>", 1)[0]
    assert "PREF3" in table and "PFINE" not in table and "PSOUTH" not in table
    assert "REFER</strong> · 3" in table
    assert "PSOUTH" in client.get("/", headers=web_cookie(client, other)).text
    with session_scope(url) as s:  # results older than a week drop off the list
        s.execute(update(PatientResult).values(computed_at=utcnow() - timedelta(days=8)))
    assert 'data-testid="to-refer-none"' in client.get("/", headers=web_cookie(client, key)).text


def test_a_lookup_posted_signed_out_is_not_called_unsaved(client: TestClient) -> None:
    """The session-29 review: a patient lookup (a POST only to keep the id out of the URL) got the
    "what you sent was not saved" notice."""
    resp = client.post("/patients", data={"patient_id": "P1"}, follow_redirects=False)
    assert resp.status_code == 303 and "unsaved" not in resp.headers["location"]


def test_a_refused_job_form_is_not_sent_again_by_the_pages_refresh(client: TestClient, url: str) -> None:
    """The session-30 review: while a job ran, the page answering a refused folder carried the
    5-s self-refresh, and each reload posted the refused form again (6 POSTs in 27 s)."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        repo.create_job(s, clinic.id, "/imports/north/running")  # queued: the list refreshes
    assert "data-refresh-seconds" in client.get("/jobs", headers=cookie).text
    refused = client.post(
        "/jobs", headers=cookie, data={"folder": "/not/an/import/root"}, follow_redirects=False
    )
    assert refused.status_code >= 400 and 'data-testid="job-error"' in refused.text
    assert "data-refresh-seconds" not in refused.text
