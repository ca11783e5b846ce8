"""`drscreen model activate` against grades being written, on real PostgreSQL (a fresh database per
test). A worker writing a batch holds its release's row (``repo.lock_release_for_writing``); an
activation locks every release row first. So the activation waits for grades already being
written, and a write that starts while an activation is open waits for it and then sees the new
active release (and writes nothing: ``workers.scoring._give_back``)."""

from __future__ import annotations

import threading
import time

import pytest

from core import repository as repo
from core.db import session_scope

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OLD, NEW = "stub-ensemble@0.0.1", "stub-next@0.0.3"
HOLD_S = 1.0


def _activate_in_background(url: str, finished: list[float]) -> threading.Thread:
    def run() -> None:
        with session_scope(url) as s:
            repo.activate_release(s, NEW)
        finished.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_activation_waits_for_grades_being_written(own_pg_url: str) -> None:
    with session_scope(own_pg_url) as s:
        repo.activate_release(s, OLD)
    finished: list[float] = []
    with session_scope(own_pg_url) as writer:
        release = repo.get_or_create_model_version(writer, OLD)
        assert repo.lock_release_for_writing(writer, release) is None  # OLD is the active one
        thread = _activate_in_background(own_pg_url, finished)
        time.sleep(HOLD_S)
        assert finished == [], "the activation did not wait for the write"
        committed = time.monotonic()
    thread.join(30)
    assert finished and finished[0] >= committed
    with session_scope(own_pg_url) as s:
        assert repo.active_release(s) == NEW


def test_a_write_during_an_activation_waits_and_sees_the_new_release(own_pg_url: str) -> None:
    with session_scope(own_pg_url) as s:
        repo.activate_release(s, OLD)
        repo.get_or_create_model_version(s, NEW)
    seen: list[str | None] = []

    def write() -> None:
        with session_scope(own_pg_url) as writer:
            seen.append(repo.lock_release_for_writing(writer, repo.get_or_create_model_version(writer, OLD)))

    with session_scope(own_pg_url) as operator:
        repo.activate_release(operator, NEW)  # locks every release row until it commits
        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(HOLD_S)
        assert seen == [], "the write did not wait for the activation"
    thread.join(30)
    assert seen == [NEW]
