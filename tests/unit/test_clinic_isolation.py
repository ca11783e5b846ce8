"""Clinic isolation on every endpoint that touches patient data, API and web interface alike.

North's visit, folder job, heatmap and patients are fully scored (stand-in ensemble, SQLite); each
read is first shown to work for North (so a 404 below means isolation, not a broken fixture), then
asked for with South's key: every one answers 404 and no body carries North's identifiers. South's
writes with North's patient ids and Idempotency-Key create South's own rows and never touch North's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from tests.api_support import Key, make_key, sample_bytes, web_cookie
from tests.unit.test_workers_scoring import PHOTOS, Sent, StubEnsemble, add_images
from workers import explain as explain_mod
from workers import scoring

NORTH, SOUTH = "North clinic", "South clinic"
VISIT_PATIENT, JOB_PATIENT = "NORTH-VISIT-0917", "NORTH-JOB-0442"


@dataclass
class NorthData:
    image: str
    bundle: str
    job: str
    job_image: str


@pytest.fixture
def keys(url: str) -> tuple[Key, Key]:
    return make_key(url, NORTH), make_key(url, SOUTH)


@pytest.fixture
def north(url: str, keys: tuple[Key, Key]) -> NorthData:
    store = FileStore(get_settings().store_path)
    visit = add_images(
        url,
        store,
        VISIT_PATIENT,
        [("l.jpg", sample_bytes("16", "left"), "left"), ("r.jpg", sample_bytes("16", "right"), "right")],
        clinic=NORTH,
        bundle=True,
    )
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, NORTH)
        job_id = repo.create_job(s, clinic.id, str(PHOTOS)).id
    [job_image] = add_images(
        url, store, JOB_PATIENT, [("j.jpg", (PHOTOS / "1012_left.jpg").read_bytes(), "left")], clinic=NORTH,
        job_id=job_id,
    )  # fmt: skip
    with session_scope(url) as s:
        repo.add_job_items(s, job_id, [repo.JobItemSpec("1012_left.jpg", JOB_PATIENT, "left")])
        [item] = repo.job_items(s, job_id)
        repo.set_job_item(s, item, status="queued", image_id=job_image)
    ens = StubEnsemble()
    ids = [*visit, job_image]
    summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=Sent(), explain=False)
    assert sorted(summary.scored + summary.ungradable) == sorted(ids)
    left = visit[0]
    assert explain_mod.explain_image(left, ensemble=ens, store=store, db_url=url) is not None
    with session_scope(url) as s:
        image = repo.get_image(s, left)
        assert image is not None and image.bundle_id is not None
        return NorthData(left, image.bundle_id, job_id, job_image)


def _reads(n: NorthData) -> list[str]:
    return [
        # the API
        f"/v1/images/{n.image}",
        f"/v1/images/{n.image}/explanation",
        f"/v1/images/{n.job_image}",
        f"/v1/bundles/{n.bundle}",
        f"/v1/jobs/{n.job}",
        f"/v1/jobs/{n.job}/results",
        f"/v1/jobs/{n.job}/results?format=csv",
        f"/v1/patients/{VISIT_PATIENT}",
        f"/v1/patients/{JOB_PATIENT}",
        # the web interface (signed in with the key cookie)
        f"/bundles/{n.bundle}",
        f"/bundles/{n.bundle}/progress",
        f"/images/{n.image}",
        f"/images/{n.image}/progress",
        f"/images/{n.image}/photo",
        f"/images/{n.image}/heatmap",
        f"/jobs/{n.job}/results.csv",
    ]


def _get(client: TestClient, key: Key, path: str) -> tuple[int, bytes]:
    headers = key.headers if path.startswith("/v1/") else web_cookie(client, key)
    resp = client.get(path, headers=headers, follow_redirects=False)
    return resp.status_code, resp.content


def test_every_read_is_confined_to_its_clinic(
    client: TestClient, keys: tuple[Key, Key], north: NorthData
) -> None:
    north_key, south_key = keys
    for path in _reads(north):
        status, _ = _get(client, north_key, path)
        assert status == 200, ("North's own read failed", path, status)
    for path in _reads(north):
        status, body = _get(client, south_key, path)
        assert status == 404, ("South reached North's data", path, status)
        for secret in (VISIT_PATIENT.encode(), JOB_PATIENT.encode(), b"1012_left"):
            assert secret not in body, (path, secret)


def test_web_listings_and_lookups_show_only_the_clinics_own(
    client: TestClient, keys: tuple[Key, Key], north: NorthData
) -> None:
    north_key, south_key = keys
    cookie = web_cookie(client, south_key)
    for path in ("/", "/jobs"):
        resp = client.get(path, headers=cookie)
        assert resp.status_code == 200, path
        assert north.job not in resp.text and north.bundle not in resp.text and north.image not in resp.text
    resp = client.post("/patients", headers=cookie, data={"patient_id": VISIT_PATIENT})
    assert resp.status_code == 404 and "0917" not in resp.text.replace(f'value="{VISIT_PATIENT}"', "")
    own = client.post("/patients", headers=web_cookie(client, north_key), data={"patient_id": VISIT_PATIENT})
    assert own.status_code == 200


def test_writes_with_north_ids_stay_in_south(
    client: TestClient, keys: tuple[Key, Key], north: NorthData
) -> None:
    north_key, south_key = keys
    before = client.get(f"/v1/patients/{VISIT_PATIENT}", headers=north_key.headers).json()
    # North's retried upload, then South posting with the same Idempotency-Key and patient id.
    form = {"patient_id": VISIT_PATIENT, "eye": "left"}
    photo = {"file": ("x.jpg", sample_bytes("19", "left"), "image/jpeg")}
    idem = {"Idempotency-Key": "visit-2024-05-01-0001"}
    first = client.post("/v1/images", headers=north_key.headers | idem, data=form, files=photo)
    assert first.status_code == 202, first.text
    south = client.post("/v1/images", headers=south_key.headers | idem, data=form, files=photo)
    assert south.status_code == 202, south.text
    assert south.json()["id"] != first.json()["id"]  # not North's answer replayed to South
    # South's image is South's patient's; North's record shows none of it.
    assert client.get(f"/v1/images/{south.json()['id']}", headers=north_key.headers).status_code == 404
    mine = client.get(f"/v1/images/{south.json()['id']}", headers=south_key.headers).json()
    assert mine["patient_id"] == VISIT_PATIENT
    after = client.get(f"/v1/patients/{VISIT_PATIENT}", headers=north_key.headers).json()
    assert south.json()["id"] not in str(after) and len(after["history"]) == len(before["history"])
    # A bundle posted by South for North's patient id is South's too.
    resp = client.post(
        "/v1/bundles",
        headers=south_key.headers,
        data={"patient_id": VISIT_PATIENT},
        files={"left_1": ("l.jpg", sample_bytes("19", "left"), "image/jpeg")},
    )
    assert resp.status_code == 202, resp.text
    assert client.get(f"/v1/bundles/{resp.json()['id']}", headers=north_key.headers).status_code == 404
