"""Wall clocks that disagree: a worker host whose clock is behind another's, or one stepped back by
NTP, must not change which result or release is the current one (the time review, session 32).

The clocks are the code's own (``utcnow`` in the module that stamps the row), shifted as a second
machine's would be (tests/conftest.py's ``shifted_clock``); the rows are written and read through
the real repository on SQLite here and on PostgreSQL in tests/integration/test_clock_steps_pg.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from core import repository as repo
from core.db import session_scope
from core.migrate import upgrade
from core.repository.releases import activated_version_id
from core.store import FileStore
from services.views import patient_summary
from tests.unit.test_patient_summary import GradeStub
from tests.unit.test_workers_scoring import Sent, add_images, photo
from workers import scoring

#: How far the first worker's clock is ahead of the second's (an NTP step back of ten minutes,
#: or two worker hosts ten minutes apart).
SKEW = timedelta(minutes=10)


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'db' / 'clock.db'}"
    upgrade(u)
    return u


def newer_result_of_a_clock_behind(
    url: str, store: FileStore, shift: Callable[[str, timedelta], None]
) -> None:
    """A visit graded "no referral" by a worker whose clock is ahead, then a referable second
    photograph of the left eye graded by a worker whose clock is right (or by the same one after
    an NTP step back): the patient is referred, on every read."""
    shift("core.repository.patient_results", SKEW)
    clean = add_images(url, store, "PSKEW", [photo("16_left.jpg"), photo("16_right.jpg")])
    scoring.score_images(clean, ensemble=GradeStub(grade=0), store=store, db_url=url, enqueue=Sent())
    shift("core.repository.patient_results", timedelta(0))
    [referable] = add_images(url, store, "PSKEW", [photo("17_left.jpg")])
    scoring.score_images([referable], ensemble=GradeStub(grade=3), store=store, db_url=url, enqueue=Sent())

    with session_scope(url) as s:
        patient = repo.get_patient(s, repo.get_or_create_clinic(s, "North").id, "PSKEW")
        assert patient is not None
        history = repo.patient_history(s, patient.id)
        assert [r.referable for r in history] == [True, False]  # recorded last, listed first
        assert history[0].is_current and history[0].computed_at < history[1].computed_at  # the clocks
        summary = patient_summary(s, patient)  # GET /v1/patients/{id} and the patient's page
        assert (summary.referable, summary.referral_reasons) == (True, ["left_eye_photograph_referable"])
        assert referable in summary.eyes["left"].image_ids
        newest = repo.newest_patient_results(s, [patient.id])[patient.id]  # a job's list of patients
        assert newest.id == history[0].id
        current = repo.get_current_patient_result(s, patient.id)
        assert current is not None and current.id == history[0].id


def test_a_newer_result_from_a_clock_behind_is_the_patients_result(
    url: str, tmp_path: Path, shifted_clock: Callable[[str, timedelta], None]
) -> None:
    """Before: the newest result was the one with the latest wall-clock time, so the "no referral"
    stamped ten minutes ahead stayed the patient's result (API, page, job CSV) while the home
    page's worklist, which reads ``is_current``, listed the patient as REFER."""
    newer_result_of_a_clock_behind(url, FileStore(tmp_path / "store"), shifted_clock)


def rollback_from_a_clock_behind(url: str, shift: Callable[[str, timedelta], None]) -> None:
    """1.1 activated from a machine whose clock is ahead, then a rollback to 1.0 from one whose
    clock is right, minutes later: 1.0 is the active release."""
    shift("core.repository.releases", SKEW)
    with session_scope(url) as s:
        repo.activate_release(s, "stub-ensemble@1.0.0")
        repo.activate_release(s, "stub-ensemble@1.1.0")
    shift("core.repository.releases", timedelta(0))
    with session_scope(url) as s:
        repo.activate_release(s, "stub-ensemble@1.0.0")
    with session_scope(url) as s:
        assert repo.active_release(s) == "stub-ensemble@1.0.0"
        assert repo.other_active_release(s, "stub-ensemble@1.1.0") == "stub-ensemble@1.0.0"
        version = repo.get_model_version_by_ref(s, "stub-ensemble@1.0.0")
        assert version is not None and activated_version_id(s) == version.id  # grading queue, agreement


def test_a_rollback_from_a_clock_behind_is_the_active_release(
    url: str, shifted_clock: Callable[[str, timedelta], None]
) -> None:
    """Before: the active release was the one activated at the latest wall-clock time, so the
    rollback was ignored (every worker kept serving 1.1, a worker of 1.0 refused to start) until
    the wall clock passed the earlier activation's time."""
    rollback_from_a_clock_behind(url, shifted_clock)
