"""Repository round trips on a SQLite file (the embedded default), schema made by the migration."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from core import repository as repo
from core.aggregation import argmax_grade
from core.db import get_engine, session_scope
from core.errors import InvalidInput
from core.migrate import upgrade
from core.tables import Image


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'db' / 'unit.db'}"
    upgrade(u)
    return u


@pytest.fixture
def session(url: str) -> Iterator[Session]:
    with session_scope(url) as s:
        yield s


def test_sqlite_pragmas(url: str) -> None:
    with get_engine(url).connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_api_keys(session: Session, tmp_path: Path) -> None:
    clinic = repo.get_or_create_clinic(session, "North")
    assert repo.get_or_create_clinic(session, "North").id == clinic.id
    row, key = repo.create_api_key(session, clinic, label="front desk")
    assert row.key_hash == repo.hash_api_key(key) and key.startswith(row.prefix)
    assert repo.authenticate_api_key(session, key) is not None
    assert repo.authenticate_api_key(session, key + "x") is None
    assert repo.revoke_api_key(session, row.prefix, store_dir=tmp_path) == 1
    assert repo.authenticate_api_key(session, key) is None
    assert repo.revoke_api_key(session, row.id, store_dir=tmp_path) == 0


def _image(
    session: Session, clinic_id: int, patient_id: int, eye: str, sha256: str | None = None, **kw: object
) -> Image:
    return repo.create_image(
        session,
        clinic_id=clinic_id,
        patient_id=patient_id,
        eye=eye,
        sha256=sha256 or uuid.uuid4().hex * 2,  # distinct photographs unless the test says
        stored_path="00/00/x.png",
        size_bytes=1,
        **kw,  # type: ignore[arg-type]
    )


def _graded(
    session: Session,
    clinic_id: int,
    patient_id: int,
    model_version_id: int,
    eye: str,
    grade: int,
    *,
    sha256: str | None = None,
    probabilities: list[float] | None = None,
) -> Image:
    """A photograph scored gradable with ``grade`` (its probabilities all on that grade unless given)."""
    im = _image(session, clinic_id, patient_id, eye, sha256=sha256)
    if probabilities is None:
        probabilities = [0.0] * 5
        probabilities[grade] = 1.0
    repo.upsert_prediction(
        session, image_id=im.id, model_version_id=model_version_id, grade=grade, probabilities=probabilities,
        members=None, referable=grade >= 2, gradable=True,
    )  # fmt: skip
    repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)
    return im


def test_images_bundles_predictions_results(session: Session) -> None:
    a = repo.get_or_create_clinic(session, "A")
    b = repo.get_or_create_clinic(session, "B")
    pa = repo.get_or_create_patient(session, a.id, "P1")
    pb = repo.get_or_create_patient(session, b.id, "P1")
    assert pa.id != pb.id and repo.get_patient(session, a.id, "P1") is pa
    with pytest.raises(InvalidInput):
        repo.get_or_create_patient(session, a.id, "  ")
    bundle = repo.create_bundle(session, a.id, pa.id)
    left = _image(session, a.id, pa.id, "left", bundle_id=bundle.id)
    right = _image(session, a.id, pa.id, "right", bundle_id=bundle.id)
    with pytest.raises(InvalidInput):
        _image(session, a.id, pa.id, "middle")
    assert repo.get_image(session, left.id, clinic_id=b.id) is None
    assert repo.get_bundle(session, bundle.id, clinic_id=b.id) is None
    assert repo.refresh_bundle_status(session, bundle.id).status == "queued"

    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})
    claimed = repo.claim_image(session, left.id)
    assert claimed is not None and claimed.status == "running" and claimed.attempts == 1
    assert repo.refresh_bundle_status(session, bundle.id).status == "running"
    p = repo.upsert_prediction(
        session,
        image_id=left.id,
        model_version_id=mv.id,
        grade=2,
        probabilities=[0, 0, 1, 0, 0],
        members=None,
        referable=True,
    )
    p2 = repo.upsert_prediction(
        session,
        image_id=left.id,
        model_version_id=mv.id,
        grade=2,
        probabilities=[0, 0, 1, 0, 0],
        members={"m@1": [0, 0, 1, 0, 0]},
        referable=True,
    )
    assert p.id == p2.id and p2.members == {"m@1": [0, 0, 1, 0, 0]}
    repo.mark_image_done(session, left, quality={"gradable": True}, gradable=True)
    repo.claim_image(session, right.id)
    repo.mark_image_failed(session, right, "corrupt")
    assert repo.refresh_bundle_status(session, bundle.id).status == "done"
    assert repo.get_prediction(session, left.id).grade == 2  # type: ignore[union-attr]

    res = repo.recompute_patient(session, pa.id, model_version_id=mv.id, grade_fn=argmax_grade, trigger="t")
    assert (res.grade, res.gradable, res.referable) == (2, True, True)
    eyes = {e.eye: e for e in res.eyes}
    assert eyes["right"].grade is None and not eyes["right"].gradable
    assert repo.get_current_patient_result(session, pa.id).id == res.id  # type: ignore[union-attr]

    ex = repo.upsert_explanation(
        session, image_id=left.id, model_version_id=mv.id, sha256="1" * 64, stored_path="a"
    )
    assert repo.get_explanation(session, left.id).id == ex.id  # type: ignore[union-attr]
    ev = repo.record_audit(session, action="image.read", clinic_id=a.id, patient_id=pa.id, target_id=left.id)
    assert repo.list_audit_events(session, a.id)[0].id == ev.id


def test_jobs(session: Session) -> None:
    c = repo.get_or_create_clinic(session, "J")
    patient = repo.get_or_create_patient(session, c.id, "P")
    job = repo.create_job(session, c.id, "/data")
    repo.add_job_items(
        session, job.id, [repo.JobItemSpec("x.png", "P", "left"), repo.JobItemSpec("y.png", "P", "right")]
    )
    items = repo.job_items(session, job.id)
    im = _image(session, c.id, patient.id, "left", job_id=job.id)
    repo.set_job_item(session, items[0], status="queued", image_id=im.id)
    repo.set_job_item(session, items[1], status="failed", error="not an image")
    assert repo.refresh_job_counts(session, job.id).status == "running"
    mv = repo.get_or_create_model_version(session, "ens@1")
    repo.upsert_prediction(
        session,
        image_id=im.id,
        model_version_id=mv.id,
        grade=3,
        probabilities=[0, 0, 0, 1, 0],
        members=None,
        referable=True,
    )
    repo.mark_image_done(session, im, quality=None, gradable=True)
    repo.set_job_item(session, items[0], status="done")  # as the worker's scoring does
    j = repo.refresh_job_counts(session, job.id)
    assert (j.total, j.done, j.failed, j.status) == (2, 1, 1, "done")
    assert repo.job_grade_counts(session, job.id)["3"] == 1

    # A newer release grades the patient again (scoring.py requeues the photograph; its item stays
    # done): the finished job's grade counts kept dropping the photograph until then, no longer
    # adding up to ``done`` (session 22's known leftover).
    repo.requeue_image(session, im)
    j = repo.refresh_job_counts(session, job.id)
    assert (j.done, j.failed) == (1, 1)
    assert repo.job_grade_counts(session, job.id) == {"0": 0, "1": 0, "2": 0, "3": 1, "4": 0, "ungradable": 0}
    newer = repo.get_or_create_model_version(session, "ens@2")
    repo.upsert_prediction(
        session, image_id=im.id, model_version_id=newer.id, grade=1, probabilities=[0, 1, 0, 0, 0],
        members=None, referable=False,
    )  # fmt: skip
    repo.mark_image_done(session, im, quality=None, gradable=True)
    assert (
        repo.job_grade_counts(session, job.id)["1"] == 1 and repo.job_grade_counts(session, job.id)["3"] == 0
    )
    repo.mark_image_failed(session, im, "the newer release could not read it")
    assert (
        repo.refresh_job_counts(session, job.id).done,
        sum(repo.job_grade_counts(session, job.id).values()),
    ) == (0, 0)


def test_a_patient_result_comes_from_the_latest_visit(session: Session) -> None:
    """Photographs a year apart are two visits: a follow-up's result is not averaged with the
    first visit's (the audit's patient with three grade-0 visits then a grade-4 eye got grade 2)."""
    from datetime import timedelta

    from core.tables import utcnow

    clinic = repo.get_or_create_clinic(session, "V")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})

    def visit(grades: dict[str, int], when: object) -> list[str]:
        ids = []
        for eye, grade in grades.items():
            im = _graded(session, clinic.id, patient.id, mv.id, eye, grade)
            im.created_at = im.sent_at = when  # type: ignore[assignment]
            ids.append(im.id)
        return ids

    now = utcnow()
    for months in (36, 24, 12):
        visit({"left": 0, "right": 0}, now - timedelta(days=30 * months))
    latest = visit({"left": 4, "right": 3}, now)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (result.grade, result.referable) == (4, True)
    assert sorted(i for e in result.eyes for i in e.image_ids) == sorted(latest)

    # the same day is the same visit; a zero window takes every photograph (the old behaviour)
    again = visit({"left": 4}, now + timedelta(hours=2))
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert result.grade == 4 and again[0] in {i for e in result.eyes for i in e.image_ids}
    everything = repo.recompute_patient(
        session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade, visit_window=timedelta(0)
    )
    assert len([i for e in everything.eyes for i in e.image_ids]) == 9


def test_a_follow_up_waiting_for_a_worker_does_not_show_the_last_visits_grade(session: Session) -> None:
    """The review: while a follow-up's photograph was queued, GET /v1/patients showed last year's
    grade 0, not referable, beside today's image id, as if it were today's result."""
    from datetime import timedelta

    from core.tables import utcnow
    from services.views import patient_summary

    clinic = repo.get_or_create_clinic(session, "F")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})
    last_year = []
    for eye in ("left", "right"):
        im = _image(session, clinic.id, patient.id, eye)
        im.created_at = im.sent_at = utcnow() - timedelta(days=365)  # type: ignore[assignment]
        repo.upsert_prediction(
            session, image_id=im.id, model_version_id=mv.id, grade=0, probabilities=[1.0, 0, 0, 0, 0],
            members=None, referable=False, gradable=True,
        )  # fmt: skip
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)
        last_year.append(im.id)
    session.flush()
    session.expire_all()  # timestamps as the database gives them back
    repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (patient_summary(session, patient).grade, patient_summary(session, patient).referable) == (
        0,
        False,
    )

    today = _image(session, clinic.id, patient.id, "left")  # queued
    session.flush()
    session.expire_all()  # timestamps as the database gives them back
    summary = patient_summary(session, patient)
    assert (summary.grade, summary.referable, summary.updated_at, summary.model_version) == (
        None,
        True,
        None,
        None,
    )
    assert summary.referral_reasons == ["not_graded_yet", "left_eye_pending"]
    # both eyes, always (the contract's left/right): clinic code reads eyes["right"] while it polls
    assert {eye: e.image_ids for eye, e in summary.eyes.items()} == {"left": [today.id], "right": []}
    assert (summary.eyes["right"].gradable, summary.eyes["right"].grade) == (False, None)
    assert [entry.grade for entry in summary.history] == [0]  # last year's result is history

    repo.upsert_prediction(
        session, image_id=today.id, model_version_id=mv.id, grade=2, probabilities=[0, 0, 1.0, 0, 0],
        members=None, referable=True, gradable=True,
    )  # fmt: skip
    repo.mark_image_done(session, today, quality={"gradable": True}, gradable=True)
    repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    summary = patient_summary(session, patient)
    assert (summary.grade, summary.referable) == (2, True)
    assert summary.referral_reasons == ["left_eye_referable_dr", "right_eye_not_photographed"]
    assert [entry.grade for entry in summary.history] == [2, 0]


def test_no_referral_waits_for_the_visits_photographs_still_being_scored(session: Session) -> None:
    """The operator walkthrough: both eyes graded 0, then a second left photograph of the visit was
    queued, and the patient read "not referable" with its id in the left eye's list."""
    from services.views import patient_summary

    clinic = repo.get_or_create_clinic(session, "Q")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})

    def graded(im: Image) -> None:
        repo.upsert_prediction(
            session, image_id=im.id, model_version_id=mv.id, grade=0, probabilities=[1.0, 0, 0, 0, 0],
            members=None, referable=False, gradable=True,
        )  # fmt: skip
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)

    for eye in ("left", "right"):
        graded(_image(session, clinic.id, patient.id, eye))
    repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    second = _image(session, clinic.id, patient.id, "left")  # queued
    session.flush()
    session.expire_all()
    summary = patient_summary(session, patient)
    assert (summary.grade, summary.referable, summary.referral_reasons) == (0, True, ["left_eye_pending"])
    graded(second)
    repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    summary = patient_summary(session, patient)
    assert (summary.grade, summary.referable, summary.referral_reasons) == (0, False, [])


def test_a_photograph_being_scored_again_counts_ungradable_in_its_release_result(session: Session) -> None:
    """The session-31 mutation review: a photograph queued, or running, again (``requeue_image``)
    that already has a prediction of the release aggregated (a release activated again while a
    newer one's re-scoring waits) counts as not graded until it is done, as
    ``recompute_patient`` says; no test had one. Counted by its earlier prediction, the patient
    would read "no referral" from a grade its release is still redoing (the re-scoring's result
    is recorded at once, erring towards referral: workers/scoring.py)."""
    clinic = repo.get_or_create_clinic(session, "S")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {})
    left = _graded(session, clinic.id, patient.id, mv.id, "left", 0)
    _graded(session, clinic.id, patient.id, mv.id, "right", 0)
    session.flush()
    session.expire_all()  # timestamps as the database gives them back
    graded = repo.patient_aggregate(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (graded.grade, graded.referable, graded.eyes["left"].grade) == (0, False, 0)
    repo.requeue_image(session, left)
    assert repo.get_prediction(session, left.id, mv.id) is not None  # its prediction stays
    for status in ("queued", "running"):
        left.status = status
        session.flush()
        session.expire_all()
        again = repo.patient_aggregate(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
        eye = again.eyes["left"]
        assert (eye.grade, eye.gradable, eye.referable) == (None, False, True), status
        assert eye.image_ids == [left.id]
        assert (again.grade, again.referable) == (0, True), status  # the right eye's grade, referred


def test_a_result_sharing_only_some_photographs_with_the_latest_visit_is_not_current(
    session: Session,
) -> None:
    """The review: A (30 h ago) and B (10 h ago) graded together, then C arrives: the latest visit is
    B and C (24-hour window), and the A+B result was still shown as current."""
    from datetime import timedelta

    from core.tables import utcnow
    from services.views import patient_summary

    clinic = repo.get_or_create_clinic(session, "W")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})
    for eye, hours in (("left", 30), ("right", 10)):
        im = _image(session, clinic.id, patient.id, eye)
        im.created_at = im.sent_at = utcnow() - timedelta(hours=hours)  # type: ignore[assignment]
        repo.upsert_prediction(
            session, image_id=im.id, model_version_id=mv.id, grade=0, probabilities=[1.0, 0, 0, 0, 0],
            members=None, referable=False, gradable=True,
        )  # fmt: skip
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)
    session.flush()
    session.expire_all()
    repo.recompute_patient(
        session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade, visit_window=timedelta(hours=48)
    )
    _image(session, clinic.id, patient.id, "left")  # C, queued
    session.flush()
    session.expire_all()
    summary = patient_summary(session, patient)
    assert (summary.grade, summary.referable) == (None, True)
    assert summary.referral_reasons == ["not_graded_yet", "left_eye_pending"]


def test_one_photograph_stored_as_both_eyes_grades_neither(session: Session) -> None:
    """The walkthrough: byte-identical D7_left.jpg and D7_right.jpg in a folder (or two single
    uploads) made a grade-0, not-referable patient with one eye never photographed."""
    clinic = repo.get_or_create_clinic(session, "B")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})

    def scored(eye: str, sha: str) -> None:
        im = _image(session, clinic.id, patient.id, eye, sha256=sha)
        repo.upsert_prediction(
            session, image_id=im.id, model_version_id=mv.id, grade=0, probabilities=[1.0, 0, 0, 0, 0],
            members=None, referable=False, gradable=True,
        )  # fmt: skip
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)

    scored("left", "a" * 64)
    scored("right", "a" * 64)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (result.grade, result.gradable, result.referable) == (None, False, True)
    assert {e.eye: (e.gradable, e.referable) for e in result.eyes} == {
        "left": (False, True),
        "right": (False, True),
    }
    # each eye's own photograph grades it again
    scored("left", "b" * 64)
    scored("right", "c" * 64)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (result.grade, result.referable) == (0, False)


def test_a_referable_photograph_sent_as_both_eyes_refers_the_patient(session: Session) -> None:
    """The session-29 review: a grade-2 photograph sent as the left and the right eye beside each
    eye's own grade-0 photograph counted for neither eye, and the patient read "No referral"."""
    clinic = repo.get_or_create_clinic(session, "E")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})

    for eye, sha, grade in (("left", "b", 0), ("right", "c", 0), ("left", "a", 2), ("right", "a", 2)):
        _graded(session, clinic.id, patient.id, mv.id, eye, grade, sha256=sha * 64)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (result.grade, result.gradable, result.referable) == (0, True, True)
    assert {e.eye: (e.grade, e.referable) for e in result.eyes} == {"left": (0, True), "right": (0, True)}


def test_the_same_photograph_sent_twice_counts_once_in_its_eye(session: Session) -> None:
    """A retry without Idempotency-Key stores a second image of the same bytes: it must not
    outweigh the eye's other photograph (the audit's double-weighted mean)."""
    clinic = repo.get_or_create_clinic(session, "D")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"members": ["m@1"]})

    def scored(eye: str, sha: str, p_grade2: float) -> None:
        im = _image(session, clinic.id, patient.id, eye, sha256=sha)
        probs = [1.0 - p_grade2, 0.0, p_grade2, 0.0, 0.0]
        repo.upsert_prediction(
            session, image_id=im.id, model_version_id=mv.id, grade=0, probabilities=probs,
            members=None, referable=False, gradable=True,
        )  # fmt: skip
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)

    scored("left", "a" * 64, 0.8)  # grade 2 alone
    scored("left", "b" * 64, 0.2)  # grade 0 alone
    scored("left", "b" * 64, 0.2)  # the same bytes again
    scored("right", "c" * 64, 0.0)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    left = next(e for e in result.eyes if e.eye == "left")
    # counted once each: mean P(grade 2) = 0.5, so argmax is a tie resolved to grade 0; counted
    # twice it would be 0.4. The probabilities say which.
    assert left.probabilities is not None and abs(left.probabilities[2] - 0.5) < 1e-9
    # the same bytes under the other eye too: one eye sent as both, and nothing says which, so
    # neither eye counts them (session 23; they were counted in both)
    scored("right", "b" * 64, 0.2)
    result = repo.recompute_patient(session, patient.id, model_version_id=mv.id, grade_fn=argmax_grade)
    eyes = {e.eye: e.probabilities for e in result.eyes}
    assert eyes["left"] is not None and abs(eyes["left"][2] - 0.8) < 1e-9
    assert eyes["right"] is not None and abs(eyes["right"][2] - 0.0) < 1e-9


def test_a_resubmitted_photograph_is_judged_by_the_active_release(session: Session) -> None:
    """The review: a folder job expanded by a worker still on the release registered later, after a
    rollback to the one registered first, took a photograph only that later release graded as
    scored; the active release never graded it."""
    clinic = repo.get_or_create_clinic(session, "R")
    patient = repo.get_or_create_patient(session, clinic.id, "P")
    first = repo.get_or_create_model_version(session, "ens@1.5.0", {})
    later = repo.get_or_create_model_version(session, "ens@1.6.0", {})
    im = _image(session, clinic.id, patient.id, "left")
    repo.upsert_prediction(
        session, image_id=im.id, model_version_id=later.id, grade=0, probabilities=[1.0, 0, 0, 0, 0],
        members=None, referable=False, gradable=True,
    )  # fmt: skip
    repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)
    assert not repo.needs_rescoring(session, im, later.ref)  # no activation: registered order
    repo.activate_release(session, first.ref)
    assert repo.needs_rescoring(session, im, later.ref)  # whatever release the expanding worker serves
    assert repo.needs_rescoring(session, im, first.ref)


def test_other_active_release(session: Session) -> None:
    """The one comparison behind `drscreen worker`'s refusal and a scoring task's standing aside."""
    assert repo.other_active_release(session, "a@1.0.0") is None  # nothing activated
    repo.activate_release(session, "a@1.0.0")
    assert repo.other_active_release(session, "a@1.0.0") is None
    assert repo.other_active_release(session, "b@2.0.0") == "a@1.0.0"
    repo.activate_release(session, "b@2.0.0")
    assert repo.other_active_release(session, "a@1.0.0") == "b@2.0.0"


def test_a_folder_of_thousands_of_files_is_one_job(session: Session) -> None:
    """One multi-row INSERT of 4,681+ items passed SQLite's 32,766 bound values ("too many SQL
    variables": the whole folder job failed)."""
    import sqlite3

    # SQLite's default build allows 32,766 (this Debian build 250,000): hold it to the default
    raw = session.connection().connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
    c = repo.get_or_create_clinic(session, "Big")
    job = repo.create_job(session, c.id, "/data/big")
    specs = [repo.JobItemSpec(f"{i}_left.jpg", str(i), "left") for i in range(6000)]
    assert repo.add_job_items(session, job.id, specs) == 6000
    repo.add_job_items(session, job.id, specs[:2500])  # idempotent across batches too
    assert len(repo.job_items(session, job.id)) == 6000


def test_ensure_patient_says_whether_it_created_the_row(session: Session) -> None:
    """The upload's erasure-race check trusts it: an erasure cannot delete a row this transaction
    created (an unrelated IntegrityError on a new patient was answered 409 "erased meanwhile")."""
    c = repo.get_or_create_clinic(session, "E")
    first, created = repo.ensure_patient(session, c.id, "P-9")
    again, created_again = repo.ensure_patient(session, c.id, " P-9 ")
    assert created and not created_again and first.id == again.id


def test_patient_history_read_in_batches_newest_first(session: Session) -> None:
    from datetime import timedelta

    from sqlalchemy import event

    from core.tables import EyeResult, PatientResult, utcnow

    clinic = repo.get_or_create_clinic(session, "North")
    patient = repo.get_or_create_patient(session, clinic.id, "PHIST")
    start = utcnow()
    for n in range(7):
        result = PatientResult(
            patient_id=patient.id,
            grade=n % 5,
            gradable=True,
            referable=False,
            computed_at=start + timedelta(n),
        )
        result.eyes = [
            EyeResult(
                patient_id=patient.id,
                eye="left",
                grade=n % 5,
                gradable=True,
                referable=False,
                image_ids=[f"im{n}"],
            )
        ]
        session.add(result)
    session.flush()
    session.expunge_all()  # read from the database, not the identity map
    every = [r.eyes[0].image_ids for r in repo.iter_patient_history(session, patient.id, batch=3)]
    assert every == [[f"im{n}"] for n in range(6, -1, -1)]

    statements: list[tuple[str, tuple[object, ...]]] = []
    listener = lambda *args: statements.append((args[2], tuple(args[3])))  # noqa: E731
    event.listen(session.get_bind(), "before_cursor_execute", listener)
    try:
        session.expunge_all()
        for result in repo.iter_patient_history(session, patient.id, batch=3):
            assert result.eyes[0].image_ids == ["im6"]
            break
    finally:
        event.remove(session.get_bind(), "before_cursor_execute", listener)
    # the first batch's eyes only (every result's and its eyes were loaded before)
    [eyes] = [params for sql, params in statements if "FROM eye_result" in sql]
    assert len(eyes) == 3, statements


def test_a_jobs_reads_are_cut_into_in_lists_that_a_database_accepts(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final read of session 31: a job's results read its photographs, predictions and grader
    grades with one IN list of every id (a 100,000-file job exceeds PostgreSQL's 65,535
    parameters). Cut into batches, the answers are the same."""
    from core import grader
    from core.repository import _sql

    clinic = repo.get_or_create_clinic(session, "Batch")
    patient = repo.get_or_create_patient(session, clinic.id, "B-1")
    mv = repo.get_or_create_model_version(session, "m@1")
    ids = []
    for n in range(5):
        image = repo.create_image(
            session, clinic_id=clinic.id, patient_id=patient.id, eye="left", sha256=f"{n:064x}",
            stored_path=f"p{n}", filename=f"{n}.jpg", size_bytes=1,
        )  # fmt: skip
        repo.upsert_prediction(
            session, image_id=image.id, model_version_id=mv.id, grade=n % 5, probabilities=[0.2] * 5,
            members=None, referable=n >= 2,
        )  # fmt: skip
        ids.append(image.id)
    whole = (repo.get_images(session, ids), repo.predictions_for_images(session, ids))
    monkeypatch.setattr(_sql, "IN_BATCH", 2)
    cut = (repo.get_images(session, ids), repo.predictions_for_images(session, ids))
    assert [i.id for i in cut[0]] == [i.id for i in whole[0]] == ids
    assert {k: v.grade for k, v in cut[1].items()} == {k: v.grade for k, v in whole[1].items()}
    assert grader.for_images(session, ids) == {}
