"""``drscreen db recheck-patients``: apply today's patient rule to the results recorded before it.

Session 29 changed the eye rule (an eye is referred when one of its photographs alone is graded 2
or more; a referable photograph sent as both eyes refers both). A worker applies it whenever it
records a patient's result, so results recorded before the upgrade keep the old decision until
the patient's next photograph. This walks every patient's current result, recomputes it from the
stored predictions with its own release's combination rule (no network is loaded), and records a
new result (trigger ``rule-recheck``; the old one stays in the history) only where the decision
changes. It reads the same visit only: a patient whose latest visit has photographs the current
result does not cover is left to the worker that grades them.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TRIGGER = "rule-recheck"


@dataclass
class RecheckSummary:
    checked: int = 0
    changed: list[str] = field(default_factory=list)  # patients' external ids, newly referred or not
    other_visit: int = 0  # the latest visit has photographs the current result does not cover
    # the new decision would withdraw a referral while a photograph's grading is under way
    held: int = 0
    no_release: set[str] = field(default_factory=set)  # releases not under the models folder


GradeFns = tuple[Callable[[Sequence[float]], int], Callable[[Sequence[float], Mapping[str, Any] | None], int]]


def _grade_functions(ref: str) -> GradeFns:
    """The release's grade and eye-grade functions from its manifest alone (checked: SHA256SUMS and
    the combination), as ``Ensemble.grade_from_probabilities`` / ``grade_eye`` compute them."""
    import numpy as np

    from ml.inference.combine import grade_eye, grade_from_probabilities
    from ml.inference.ensemble import check_combination
    from ml.release import read_manifest

    manifest = read_manifest(ref)
    rule = check_combination(ref, manifest)
    refs = [entry["ref"] for entry in manifest["members"]]

    def grade(probs: Sequence[float]) -> int:
        return grade_from_probabilities(rule, np.asarray(probs))

    def eye(probs: Sequence[float], members: Mapping[str, Any] | None) -> int:
        return grade_eye(rule, refs, probs, members)

    return grade, eye


def recheck_patients(*, dry_run: bool = False, database_url: str | None = None) -> RecheckSummary:
    """Recompute every current patient result; record the ones whose decision changes."""
    from sqlalchemy import select

    from core import repository as repo
    from core.db import session_scope
    from core.tables import ModelVersion, Patient, PatientResult

    summary = RecheckSummary()
    functions: dict[str, GradeFns | None] = {}
    with session_scope(database_url) as session:
        current = session.execute(
            select(PatientResult.id, PatientResult.patient_id, ModelVersion.ref)
            .join(ModelVersion, ModelVersion.id == PatientResult.model_version_id)
            .where(PatientResult.is_current.is_(True))
            .order_by(PatientResult.id)
        ).all()
    for result_id, patient_id, ref in current:
        if ref not in functions:
            try:
                functions[ref] = _grade_functions(ref)
            except (OSError, ValueError, KeyError):
                functions[ref] = None
        fns = functions[ref]
        if fns is None:
            summary.no_release.add(ref)
            continue
        with session_scope(database_url) as session:  # one patient, one transaction
            # held against a worker recording the patient meanwhile (read after the lock)
            repo.lock_patients_for_result(session, [patient_id])
            result = session.get(PatientResult, result_id)
            if result is None or not result.is_current:  # a worker recorded a newer one meanwhile
                continue
            summary.checked += 1
            assert result.model_version_id is not None  # (joined above)
            aggregate = repo.patient_aggregate(
                session, result.patient_id, model_version_id=result.model_version_id,
                grade_fn=fns[0], eye_grade_fn=fns[1],
            )  # fmt: skip
            covered = {i for eye in result.eyes for i in eye.image_ids}
            if {i for eye in aggregate.eyes.values() for i in eye.image_ids} != covered:
                summary.other_visit += 1
                continue
            was = (result.referable, {e.eye: e.referable for e in result.eyes})
            now = (aggregate.referable, {name: e.referable for name, e in aggregate.eyes.items()})
            if was == now:
                continue
            if repo.held_referral(session, result.patient_id, aggregate) is not None:
                # a photograph counted ungradable only because its grading is under way (or its
                # re-grade failed) must not withdraw the referral: its worker records the decision
                summary.held += 1
                continue
            patient = session.get(Patient, result.patient_id)
            summary.changed.append(patient.external_id if patient is not None else str(result.patient_id))
            if not dry_run:
                repo.record_patient_result(
                    session, result.patient_id, aggregate, model_version_id=result.model_version_id,
                    trigger=TRIGGER,
                )  # fmt: skip
    return summary
