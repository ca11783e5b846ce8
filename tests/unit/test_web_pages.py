"""Result pages of the web interface against the API's patient result (embedded SQLite, scoring
done in-process by tests/unit/test_workers_scoring.py's stub ensemble)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from core.settings import get_settings
from core.store import FileStore
from services.web.auth import COOKIE_NAME
from tests.api_support import make_key
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images, photo
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
    html = client.get(f"/images/{image_id}", headers={"Cookie": f"{COOKIE_NAME}={key.key}"}).text
    tone, headline = _banner(html)
    assert tone == "refer" and headline.startswith("REFER"), headline
    assert "Right eye: not photographed" in html


def test_the_patient_page_says_pending_and_not_photographed_in_words(client: TestClient, url: str) -> None:
    """The web walkthrough: a right-eye photograph still queued read as a red REFER with the right
    eye "UNGRADABLE"; an eye never photographed read "UNGRADABLE" too."""
    key = make_key(url, "North")
    cookie = {"Cookie": f"{COOKIE_NAME}={key.key}"}
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
            "/login" if form == "/" else f"/login?next={form}"
        ), route
    key = make_key(url, "North")
    cookie = {"Cookie": f"{COOKIE_NAME}={key.key}"}
    foreign = client.post(
        "/logout", headers=cookie | {"Origin": "https://elsewhere.example"}, follow_redirects=False
    )
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    assert client.post("/logout", headers=cookie, follow_redirects=False).status_code == 303


def test_a_refused_upload_keeps_the_form_and_says_why_in_words(client: TestClient, url: str) -> None:
    """The web walkthrough: a refused upload emptied the patient id and said "left_1: JPEG does not
    end with the EOI marker (FFD9)"."""
    key = make_key(url, "North")
    cookie = {"Cookie": f"{COOKIE_NAME}={key.key}"}
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
