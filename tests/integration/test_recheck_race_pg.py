"""``drscreen db recheck-patients`` while a worker records the same patient, on real PostgreSQL.

The worker's side is its own repository call (``repo.recompute_patient``, what
``workers.scoring._write`` runs) in a transaction this test keeps open; the recheck runs on a
thread and is seen waiting for a lock before that transaction commits. Before the session-32
fix the recheck read the patient without the worker's lock, then recorded its result beside the
worker's: two current results for one patient (both listed on the home page's worklist).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import select

from cli.recheck import RecheckSummary, recheck_patients
from core import repository as repo
from core.aggregation import argmax_grade
from core.db import session_scope
from core.tables import Patient, PatientResult
from tests.conftest import _psycopg_url
from tests.unit.test_recheck import REF, _recorded_before_the_rule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 60


def _lock_waiters(url: str) -> int:
    with psycopg.connect(_psycopg_url(url), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (url.rsplit("/", 1)[1],),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_recheck_during_a_workers_write_leaves_one_current_result(own_pg_url: str) -> None:
    url = own_pg_url
    _recorded_before_the_rule(url)  # the recheck would record a new result for patient P
    outcome: list[RecheckSummary | BaseException] = []

    def recheck() -> None:
        try:
            outcome.append(recheck_patients())
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    with session_scope(url) as worker:
        patient_id = worker.scalars(select(Patient.id).where(Patient.external_id == "P")).one()
        mv = repo.get_model_version_by_ref(worker, REF)
        assert mv is not None
        repo.recompute_patient(
            worker, patient_id, model_version_id=mv.id, grade_fn=argmax_grade, trigger="image:x"
        )
        thread = threading.Thread(target=recheck)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while _lock_waiters(url) < 1 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        # the worker's write commits here, the recheck still open
    thread.join(WAIT_S)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    with session_scope(url) as s:
        current = list(
            s.scalars(
                select(PatientResult.trigger).where(
                    PatientResult.patient_id == patient_id, PatientResult.is_current.is_(True)
                )
            )
        )
    assert current == ["image:x"], current  # the worker's, newer than what the recheck read
