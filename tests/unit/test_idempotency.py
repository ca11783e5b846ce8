"""``Idempotency-Key`` on the embedded defaults (SQLite file, filesystem broker): two requests with
one key at really the same time create one resource and queue it once; the same key with another
request at the same time is a conflict; a key is free again after 24 h; the key table's unique
constraint; old audit rows of keys are ignored. (The same races on PostgreSQL:
tests/integration/test_idempotency_pg.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.tables import IdempotencyKey
from services import idempotency
from tests.api_support import Key, make_key
from tests.idempotency_race import (
    counts,
    expired_key_used_again,
    install_race,
    other_request_at_once,
    post,
    same_request_twice_at_once,
    scoring_task_images,
)

# the second request cannot write while the first holds SQLite's lock: no need to wait long for it
HOLD_SECONDS = 0.5


@pytest.fixture
def key(url: str) -> Key:
    return make_key(url, "North clinic")


def queued() -> list[list[str]]:
    folder = get_settings().broker_dir / "queue"
    tasks = [scoring_task_images(p.read_bytes()) for p in sorted(folder.glob("*.uploads.msg"))]
    return [t for t in tasks if t is not None]


@pytest.mark.parametrize("kind", ["image", "bundle"])
def test_one_key_twice_at_once_creates_and_queues_one(
    client: TestClient, url: str, key: Key, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    race = install_race(monkeypatch, HOLD_SECONDS)
    same_request_twice_at_once(client, url, key, race, queued, kind)


def test_one_key_with_two_requests_at_once_is_one_upload_and_one_conflict(
    client: TestClient, url: str, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    race = install_race(monkeypatch, HOLD_SECONDS)
    other_request_at_once(client, url, key, race, queued)


def test_expired_key_can_be_used_again(client: TestClient, url: str, key: Key) -> None:
    expired_key_used_again(client, url, key, queued)


def test_key_is_unique_per_clinic(url: str, key: Key) -> None:
    south = make_key(url, "South clinic")
    row = {"kind": "image", "key_hash": "a" * 64, "fingerprint": "f" * 64, "resource_id": "r" * 32}
    with session_scope(url) as s:
        s.add_all(
            [IdempotencyKey(clinic_id=key.clinic_id, **row), IdempotencyKey(clinic_id=south.clinic_id, **row)]
        )
    with pytest.raises(sa_exc.IntegrityError), session_scope(url) as s:
        s.add(IdempotencyKey(clinic_id=key.clinic_id, **row))
        s.flush()


def test_old_audit_rows_of_keys_are_ignored(client: TestClient, url: str, key: Key) -> None:
    """Before the key table, keys were ``idempotency_key`` rows of the audit table: no longer read."""
    with session_scope(url) as s:
        repo.record_audit(
            s,
            action="idempotency_key",
            clinic_id=key.clinic_id,
            target_type="image",
            target_id=idempotency._key_hash("image", "visit-1"),
            detail={"id": "0" * 32, "fingerprint": "x"},
        )
    first = post(client, key, "image", "visit-1", "19")
    assert first.status_code == 202 and first.json()["id"] != "0" * 32
    assert post(client, key, "image", "visit-1", "19").json()["id"] == first.json()["id"]
    assert counts(url, key)["images"] == 1 and counts(url, key)["audit_keys"] == 1


def test_unrelated_integrity_error_is_not_taken_for_a_lost_race(
    client: TestClient, url: str, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IntegrityError with no committed key behind it is a real error, not a retry."""
    real = idempotency.remember

    def failing(session: Session, **kwargs: Any) -> None:
        real(session, **kwargs)
        raise sa_exc.IntegrityError("INSERT", {}, Exception("something else"))

    monkeypatch.setattr(idempotency, "remember", failing)
    with pytest.raises(sa_exc.IntegrityError):
        post(client, key, "image", "visit-2", "19")
    assert counts(url, key)["images"] == 0 and queued() == []
