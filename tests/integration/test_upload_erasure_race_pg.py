"""An upload racing an erasure of its patient, on real PostgreSQL (a fresh database per test,
``drscreen_test_<random>``).

The interleaving is made deterministic by wrapping ``core.repository.get_or_create_patient``: the
upload has found the patient row, then the erasure runs in another connection (and commits, or is
still holding its locks) before the upload inserts its rows. The upload's foreign key to the
patient then fails; the API must answer 409 ``conflict`` (send the photograph again), not 500, keep
nothing of the upload, and the next upload must create the patient again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core import repository as repo
from core import retention
from core.db import get_sessionmaker, session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Bundle, Image, Patient
from tests.api_support import Key, make_key, sample_bytes
from tests.retention_world import files

CLINIC, PATIENT = "Race clinic", "RACE-7"


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


@pytest.fixture
def key(url: str) -> Key:
    """The clinic's key, and its patient with a record to erase (no photograph being scored)."""
    k = make_key(url, CLINIC)
    with session_scope(url) as s:
        repo.get_or_create_patient(s, k.clinic_id, PATIENT)
    return k


def _count(url: str, model: Any) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


@dataclass
class Race:
    happened: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def finished(self) -> list[str]:
        for thread in self.threads:
            thread.join(timeout=30)
        return self.happened


def _erase_after_lookup(monkeypatch: pytest.MonkeyPatch, url: str, key: Key, *, committed: bool) -> Race:
    """Make the next upload's patient lookup be followed by an erasure of that patient in another
    connection: ``committed``, before the upload writes; else still holding its locks, and
    committed a moment later by a thread (the upload's INSERT waits for it)."""
    real = repo.ensure_patient
    race = Race()
    happened = race.happened

    def lookup_then_erasure(session: Any, clinic_id: int, external_id: str) -> tuple[Patient, bool]:
        found = real(session, clinic_id, external_id)
        if happened:  # only the first upload races
            return found
        eraser = get_sessionmaker(url)()
        outcome = retention.erase_patient(eraser, clinic_id, external_id, api_key_id=key.key_id, by="api")
        assert outcome.found and outcome.rows["patient"] == 1
        happened.append("erased")

        def commit() -> None:
            eraser.commit()
            retention.remove_unreferenced_files(eraser, FileStore(get_settings().store_path), outcome.files)
            eraser.close()
            happened.append("committed")

        if committed:
            commit()
        else:
            race.threads.append(threading.Timer(1.0, commit))
            race.threads[-1].start()
        return found

    monkeypatch.setattr(repo, "ensure_patient", lookup_then_erasure)
    return race


def _upload(client: TestClient, key: Key, kind: str, idem: str | None) -> Any:
    headers = key.headers | ({"Idempotency-Key": idem} if idem else {})
    form = {"patient_id": PATIENT}
    if kind == "image":
        photo = {"file": ("l.jpg", sample_bytes("229", "left"), "image/jpeg")}
        return client.post("/v1/images", headers=headers, data=form | {"eye": "left"}, files=photo)
    photos = {
        "left_1": ("l.jpg", sample_bytes("229", "left"), "image/jpeg"),
        "right_1": ("r.jpg", sample_bytes("229", "right"), "image/jpeg"),
    }
    return client.post("/v1/bundles", headers=headers, data=form, files=photos)


@pytest.mark.parametrize(
    ("kind", "idem", "committed"),
    [
        ("image", None, True),
        ("image", "visit-race-1", True),
        ("bundle", None, True),
        ("image", None, False),
        ("bundle", "visit-race-2", False),
    ],
)
def test_an_upload_racing_an_erasure_answers_409_and_keeps_nothing(
    client: TestClient,
    url: str,
    key: Key,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    idem: str | None,
    committed: bool,
) -> None:
    store = FileStore(get_settings().store_path)
    race = _erase_after_lookup(monkeypatch, url, key, committed=committed)
    started = time.monotonic()

    resp = _upload(client, key, kind, idem)

    assert race.finished() == ["erased", "committed"]  # the race took place, in this order
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["error"] == "conflict" and "being erased" in body["detail"] and "again" in body["detail"]
    if not committed:
        assert time.monotonic() - started >= 0.9  # the upload's INSERT waited for the erasure
    # nothing of the upload kept: no patient, photograph, bundle or stored file
    assert _count(url, Patient) == 0 and _count(url, Image) == 0 and _count(url, Bundle) == 0
    assert not files(store), "a photograph of the refused upload was kept"

    # sent again (with the same Idempotency-Key too): accepted, for a new record of the patient
    again = _upload(client, key, kind, idem)
    assert again.status_code == 202, again.text
    with session_scope(url) as s:
        patient = repo.get_patient(s, key.clinic_id, PATIENT)
        assert patient is not None
        assert s.scalar(select(func.count()).select_from(Image).where(Image.patient_id == patient.id)) == (
            1 if kind == "image" else 2
        )
