"""On the embedded default (SQLite) a worker's write is serialised by the database's write lock.

PostgreSQL serialises two writes of one photograph or one patient with row locks
(``SELECT ... FOR UPDATE``, ``lock_patients_for_result``: the race review of session 32). SQLite
ignores row locks: what keeps two pool children apart there is the one write lock of the database,
which a transaction takes at its first write and keeps until the commit. The worker's write reads
the photographs' status (its "already done" guard) and the patient's photographs only after
its first statement, an INSERT (``get_or_create_model_version``), has taken it. Were a read moved
before the first write (say, the release's row cached), it would read outside the lock, and a
second delivery or the other eye's write could commit in between unseen.

Each test makes that happen wherever it can: at the write's first prediction upsert, when the
write lock is free (nothing serialises the two), the other task runs to its commit right there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, PatientResult, Prediction
from tests.unit.test_sqlite_reads_hold_no_lock import write_lock_free
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images, photo
from workers import scoring


def _meanwhile(monkeypatch: pytest.MonkeyPatch, url: str, other: Callable[[], Any]) -> list[bool]:
    """Run ``other`` at the next write's first prediction upsert if the write lock is free then;
    returns [whether it was free]."""
    path = make_url(url).database
    assert path
    real = repo.upsert_prediction
    seen: list[bool] = []

    def upsert(session: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.append(write_lock_free(path))
            if seen[0]:
                other()
        return real(session, **kwargs)

    monkeypatch.setattr(repo, "upsert_prediction", upsert)
    return seen


@pytest.fixture
def store(url: str) -> FileStore:
    store = FileStore(get_settings().store_path)
    # the release's row exists, as on any deployment after its first photograph
    [warm] = add_images(url, store, "WARM", [photo("16_left.jpg")])
    scoring.score_images([warm], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    return store


def _score(url: str, store: FileStore, ids: list[str]) -> scoring.ScoreSummary:
    return scoring.score_images(ids, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())


def test_a_second_delivery_graded_alongside_writes_nothing(
    url: str, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same photograph in two messages (the sweep re-sends one waiting behind a long queue)
    taken by both pool children: one writes it, the other finds it done."""
    [image_id] = add_images(url, store, "P1", [photo("17_left.jpg")])
    seen = _meanwhile(monkeypatch, url, lambda: _score(url, store, [image_id]))
    _score(url, store, [image_id])
    with session_scope(url) as s:
        patient_id = s.get_one(Image, image_id).patient_id
        predictions = s.scalar(select(func.count()).where(Prediction.image_id == image_id))
        results = s.scalar(select(func.count()).where(PatientResult.patient_id == patient_id))
    # written twice: a second result in the patient's history, the photograph counted twice
    assert (predictions, results) == (1, 1), (predictions, results)
    assert seen == [False], "the write read the photograph's status outside the write lock"


def test_both_eyes_finishing_at_once_leave_one_current_result_counting_both(
    url: str, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's race of session 32 on SQLite: a patient's left and right photographs, one task
    each, written by two pool children at once."""
    left, right = add_images(url, store, "P2", [photo("17_left.jpg"), photo("17_right.jpg")])
    seen = _meanwhile(monkeypatch, url, lambda: _score(url, store, [right]))
    _score(url, store, [left])
    if seen == [False]:  # serialised: the other eye is written after this one
        _score(url, store, [right])
    with session_scope(url) as s:
        patient_id = s.get_one(Image, left).patient_id
        current = list(
            s.scalars(
                select(PatientResult).where(PatientResult.patient_id == patient_id, PatientResult.is_current)
            )
        )
        shown = {e.eye: (e.image_ids, e.gradable) for e in current[0].eyes} if current else {}
    assert len(current) == 1, len(current)
    assert shown == {"left": ([left], True), "right": ([right], True)}, shown
