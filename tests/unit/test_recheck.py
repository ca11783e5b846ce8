"""``drscreen db recheck-patients``: results recorded before session 29's eye rule get it."""

from __future__ import annotations

from sqlalchemy import select, update
from typer.testing import CliRunner

from cli.main import app
from cli.recheck import TRIGGER, recheck_patients
from core import repository as repo
from core.aggregation import argmax_grade
from core.db import session_scope
from core.tables import EyeResult, PatientResult
from tests.unit.test_repository_sqlite import _graded

REF = "drscreen-dev@0.1.0"  # a shipped release: its manifest's rule grades the stored probabilities


def _recorded_before_the_rule(url: str) -> None:
    """Patient P: left eye a clean photograph and one graded 2 on its own that pool to grade 0;
    its result recorded as the old rule did (not referable)."""
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        patient = repo.get_or_create_patient(s, clinic.id, "P")
        mv = repo.get_or_create_model_version(s, REF, {})
        for eye, grade, probs in (
            ("left", 0, [1.0, 0.0, 0.0, 0.0, 0.0]),
            ("left", 2, [0.6, 0.0, 0.4, 0.0, 0.0]),  # expected grade 0.8: 2 at the dev release's cuts
            ("right", 0, [1.0, 0.0, 0.0, 0.0, 0.0]),
        ):
            _graded(s, clinic.id, patient.id, mv.id, eye, grade, probabilities=probs)
        s.flush()
        s.expire_all()  # read back as stored (SQLite's naive timestamps), as a worker reads them
        repo.recompute_patient(s, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
        s.flush()
        s.execute(update(PatientResult).values(referable=False))
        s.execute(update(EyeResult).values(referable=False))


def _current(url: str) -> tuple[bool, str | None, int]:
    with session_scope(url) as s:
        rows = list(s.scalars(select(PatientResult).order_by(PatientResult.id)))
        now = next(r for r in rows if r.is_current)
        return now.referable, now.trigger, len(rows)


def test_a_result_recorded_before_the_rule_is_referred_once(url: str) -> None:
    _recorded_before_the_rule(url)
    dry = recheck_patients(dry_run=True)
    assert (dry.checked, dry.changed) == (1, ["P"]) and _current(url) == (False, None, 1)
    done = recheck_patients()
    assert done.changed == ["P"] and _current(url) == (True, TRIGGER, 2)  # the old one stays in the history
    again = recheck_patients()
    assert (again.checked, again.changed) == (1, []) and _current(url)[2] == 2


def test_the_command_says_what_it_did(url: str) -> None:
    _recorded_before_the_rule(url)
    dry = CliRunner().invoke(app, ["db", "recheck-patients", "--dry-run"])
    assert dry.exit_code == 0 and "1 patient result(s) checked, 1 would change: P" in dry.stdout
    done = CliRunner().invoke(app, ["db", "recheck-patients"])
    assert done.exit_code == 0 and "1 changed: P" in done.stdout
