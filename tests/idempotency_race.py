"""Two POSTs with one ``Idempotency-Key`` at really the same time, through the app: the hooks and
the scenarios shared by the SQLite unit tests (tests/unit/test_idempotency.py) and the PostgreSQL
integration tests (tests/integration/test_idempotency_pg.py).

:func:`install_race` hooks the route path:

- ``services.idempotency.find``: the first two calls wait for each other (a barrier) right after
  their lookup, so both requests have found no key before either writes anything (what a retry fired
  while the first request is still running does);
- ``services.idempotency.remember``: the first request to get there writes (flushes) its key row and
  then keeps its transaction open until the second one is about to write its own (at most
  ``hold_seconds``, plus a moment for that write to reach the database), so that the second INSERT
  meets an uncommitted row. On SQLite the second request cannot get that far (its first write
  waits for the database lock the first one holds), so the first just holds ``hold_seconds``;
- ``core.producer.send_score_images``: recorded (and still sent) -- the tasks queued for scoring.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core import producer
from core import repository as repo
from core.db import session_scope
from core.tables import ApiKey, AuditEvent, Bundle, IdempotencyKey, Image, utcnow
from services import idempotency
from tests.api_support import Key, sample_bytes

#: image ids of each scoring task found in the broker's queue, one list per message
QueuedFn = Callable[[], list[list[str]]]


@dataclass
class Race:
    #: image ids of every ``scoring.score_images`` task sent, one list per task
    sent: list[list[str]] = field(default_factory=list)
    finds: int = 0
    remembers: int = 0
    #: True once the second request reached remember() while the first held its key row uncommitted
    overlapped: bool = False


def install_race(monkeypatch: pytest.MonkeyPatch, hold_seconds: float = 3.0) -> Race:
    race = Race()
    lock = threading.Lock()
    both_found = threading.Barrier(2, timeout=30)
    second_writing = threading.Event()
    first_released = threading.Event()
    real_find, real_remember, real_send = idempotency.find, idempotency.remember, producer.send_score_images

    def find(*args: Any, **kwargs: Any) -> str | None:
        result = real_find(*args, **kwargs)
        with lock:
            race.finds += 1
            n = race.finds
        if n <= 2:
            both_found.wait()
        return result

    def remember(session: Session, **kwargs: Any) -> None:
        with lock:
            race.remembers += 1
            n = race.remembers
        if n == 1:
            real_remember(session, **kwargs)
            session.flush()
            if second_writing.wait(hold_seconds):
                time.sleep(0.5)  # let the second INSERT reach the database and wait there
            first_released.set()
            return
        if n == 2:
            race.overlapped = not first_released.is_set()
            second_writing.set()
        real_remember(session, **kwargs)

    def send_score_images(image_ids: Any, *, app: Any = None) -> str:
        with lock:
            race.sent.append(list(image_ids))
        return real_send(image_ids, app=app)

    monkeypatch.setattr(idempotency, "find", find)
    monkeypatch.setattr(idempotency, "remember", remember)
    monkeypatch.setattr(producer, "send_score_images", send_score_images)
    return race


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls on threads of their own at once; their results in order (re-raises the first
    exception of any)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    if errors:
        raise errors[0]
    return results


def scoring_task_images(message: str | bytes) -> list[str] | None:
    """The image ids of a kombu message (JSON, base64 body) if it is a ``scoring.score_images`` task."""
    envelope = json.loads(message)
    if envelope["headers"].get("task") != "scoring.score_images":
        return None
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    return list(args[0])


# ------------------------------------------------------------------------------------ scenarios


def prepare(url: str, key: Key, patient: str) -> None:
    """What makes two first requests write at once: the key already marked as used (else both
    requests update its ``last_used_at``) and the patient known (else the second request's INSERT
    of the patient waits for the first one's commit, PostgreSQL's ON CONFLICT)."""
    with session_scope(url) as s:
        s.execute(update(ApiKey).where(ApiKey.id == key.key_id).values(last_used_at=utcnow()))
        repo.get_or_create_patient(s, key.clinic_id, patient)


def post(client: TestClient, key: Key, kind: str, idem: str, patient: str, eye: str = "right") -> Any:
    headers = key.headers | {"Idempotency-Key": idem}
    photo = (f"{patient}_{eye}.jpg", sample_bytes(patient, eye))
    if kind == "image":
        data = {"patient_id": patient, "eye": eye}
        return client.post("/v1/images", headers=headers, data=data, files={"file": photo})
    return client.post(
        "/v1/bundles", headers=headers, data={"patient_id": patient}, files={f"{eye}_1": photo}
    )


def counts(url: str, key: Key) -> dict[str, int]:
    """The clinic's rows: images, bundles, ``*.create`` audit rows, remembered keys, and audit rows
    of the old kind (``idempotency_key``, no longer written)."""

    def count(stmt: Any) -> int:
        return int(s.scalar(stmt) or 0)

    with session_scope(url) as s:
        clinic = key.clinic_id
        n = select(func.count())
        return {
            "images": count(n.select_from(Image).where(Image.clinic_id == clinic)),
            "bundles": count(n.select_from(Bundle).where(Bundle.clinic_id == clinic)),
            "created": count(
                n.select_from(AuditEvent).where(
                    AuditEvent.clinic_id == clinic, AuditEvent.action.like("%.create")
                )
            ),
            "keys": count(n.select_from(IdempotencyKey).where(IdempotencyKey.clinic_id == clinic)),
            "audit_keys": count(
                n.select_from(AuditEvent).where(
                    AuditEvent.clinic_id == clinic, AuditEvent.action == "idempotency_key"
                )
            ),
        }


def image_ids_of(url: str, kind: str, resource_id: str) -> list[str]:
    if kind == "image":
        return [resource_id]
    with session_scope(url) as s:
        return list(s.scalars(select(Image.id).where(Image.bundle_id == resource_id)).all())


def same_request_twice_at_once(
    client: TestClient, url: str, key: Key, race: Race, queued: QueuedFn, kind: str
) -> None:
    """A retry fired while the first request still runs: one resource, both answers name it, one
    scoring task (for the winner's photographs)."""
    prepare(url, key, "19")
    first, second = together(
        lambda: post(client, key, kind, "visit-7", "19"), lambda: post(client, key, kind, "visit-7", "19")
    )
    assert race.finds >= 2, "both requests must have looked the key up before either committed"
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"]
    assert first.json().keys() == second.json().keys() == {"id", "status"}
    resource = first.json()["id"]
    got = counts(url, key)
    assert got["images"] == 1 and got["bundles"] == (1 if kind == "bundle" else 0), got
    assert got["created"] == 1 and got["keys"] == 1 and got["audit_keys"] == 0, got
    images = image_ids_of(url, kind, resource)
    assert race.sent == [images]
    assert queued() == [images]
    # and a later retry answers the same
    again = post(client, key, kind, "visit-7", "19")
    assert again.status_code == 202 and again.json()["id"] == resource
    assert counts(url, key)["images"] == 1 and race.sent == [images]


def other_request_at_once(client: TestClient, url: str, key: Key, race: Race, queued: QueuedFn) -> None:
    """The same key with two different requests at once: one is created, the other is a conflict."""
    prepare(url, key, "19")
    answers = together(
        lambda: post(client, key, "image", "visit-8", "19", "right"),
        lambda: post(client, key, "image", "visit-8", "19", "left"),
    )
    assert race.finds >= 2
    assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
    [won] = [a for a in answers if a.status_code == 202]
    [lost] = [a for a in answers if a.status_code == 409]
    assert lost.json()["error"] == "conflict"
    got = counts(url, key)
    assert got["images"] == 1 and got["created"] == 1 and got["keys"] == 1, got
    assert race.sent == [[won.json()["id"]]] and queued() == [[won.json()["id"]]]


def expired_key_used_again(client: TestClient, url: str, key: Key, queued: QueuedFn) -> None:
    """After 24 h a key is free again: its old row is replaced, and retries then answer the new
    resource (also when the new request differs from the old one)."""
    first = post(client, key, "image", "visit-9", "19", "right")
    assert first.status_code == 202
    with session_scope(url) as s:
        s.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.clinic_id == key.clinic_id)
            .values(created_at=utcnow() - idempotency.VALID_FOR - timedelta(minutes=1))
        )
    reused = post(client, key, "image", "visit-9", "19", "left")  # another request: no conflict
    assert reused.status_code == 202 and reused.json()["id"] != first.json()["id"]
    retry = post(client, key, "image", "visit-9", "19", "left")
    assert retry.status_code == 202 and retry.json()["id"] == reused.json()["id"]
    assert post(client, key, "image", "visit-9", "19", "right").status_code == 409
    got = counts(url, key)
    assert got["images"] == 2 and got["keys"] == 1, got
    with session_scope(url) as s:
        row = s.scalars(select(IdempotencyKey).where(IdempotencyKey.clinic_id == key.clinic_id)).one()
        assert row.resource_id == reused.json()["id"] and row.kind == "image"
    assert sorted(queued()) == sorted([[first.json()["id"]], [reused.json()["id"]]])
