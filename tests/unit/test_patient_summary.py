"""``services.views.patient_summary`` over real rows: what a photograph still being scored does to
a patient's decision (the test review found these branches could be changed with no test failing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import update

from core import repository as repo
from core.db import session_scope
from core.schemas import PatientSummary
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image
from services.views import patient_summary
from tests.unit.test_workers_scoring import Sent, StubEnsemble, StubPrediction, add_images, photo
from workers import scoring


@dataclass
class GradeStub(StubEnsemble):
    """Grades every photograph ``grade`` (the plain stub's grade depends on the pixels)."""

    grade: int = 0

    def predict(self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None) -> list[Any]:
        probs = [0.02] * 5
        probs[self.grade] = 0.92
        return [StubPrediction(list(probs), self.grade, {"stub-member@0.0.1": list(probs)}) for _ in images]


def _scored(url: str, store: FileStore, patient: str, names: list[str], grade: int) -> list[str]:
    ids = add_images(url, store, patient, [photo(n) for n in names])
    summary = scoring.score_images(
        ids, ensemble=GradeStub(grade=grade), store=store, db_url=url, enqueue=Sent()
    )
    assert sorted(summary.scored) == sorted(ids), summary
    return ids


def _summary(url: str, patient: str) -> PatientSummary:
    with session_scope(url) as s:
        row = repo.get_patient(s, repo.get_or_create_clinic(s, "North").id, patient)
        assert row is not None
        return patient_summary(s, row)


def test_a_photograph_being_scored_holds_back_no_referral_and_is_listed(url: str) -> None:
    store = FileStore(get_settings().store_path)
    _scored(url, store, "PRUN", ["16_left.jpg", "16_right.jpg"], grade=0)
    assert _summary(url, "PRUN").referable is False
    [second] = add_images(url, store, "PRUN", [photo("17_left.jpg")])
    for status in ("queued", "running"):  # waiting, or claimed by a worker: not final either way
        with session_scope(url) as s:
            s.execute(update(Image).where(Image.id == second).values(status=status))
        summary = _summary(url, "PRUN")
        assert (summary.referable, summary.referral_reasons) == (True, ["left_eye_pending"]), status
        assert second in summary.eyes["left"].image_ids, status  # listed beside the graded one
        assert summary.grade == 0


def test_a_referable_eye_keeps_its_reason_while_the_other_eye_has_a_photograph_pending(url: str) -> None:
    store = FileStore(get_settings().store_path)
    _scored(url, store, "PREF", ["16_left.jpg"], grade=3)
    _scored(url, store, "PREF", ["16_right.jpg"], grade=0)
    add_images(url, store, "PREF", [photo("17_right.jpg")])  # queued
    summary = _summary(url, "PREF")
    assert summary.referable is True and summary.grade == 3
    assert summary.referral_reasons == ["left_eye_referable_dr"]


def test_a_referable_second_photograph_of_an_eye_refers_the_patient(url: str) -> None:
    """The clinician's review (session 29): a grade-3 photograph pooled with a clean one of the same
    eye gave the eye grade 0 and a green "No referral" above the grade-3 photograph."""
    store = FileStore(get_settings().store_path)
    _scored(url, store, "POOL", ["16_left.jpg", "16_right.jpg"], grade=0)
    _scored(url, store, "POOL", ["17_left.jpg"], grade=3)
    summary = _summary(url, "POOL")
    assert summary.grade == 0 and summary.eyes["left"].grade == 0  # the contract's pooled grade
    assert summary.referable is True and summary.eyes["left"].referable is True
    assert summary.referral_reasons == ["left_eye_photograph_referable"]
