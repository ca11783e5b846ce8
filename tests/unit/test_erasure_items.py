"""The folder-job items an erasure or a purge deletes (core.retention._items_of), on SQLite; the
same on PostgreSQL in tests/integration/test_query_plans_pg.py.

The scale review found the predicate (``image_id IN (...) OR EXISTS (the job's clinic names the
patient)``) reading every item of every job, twice per erasure; it became two indexed lookups.
These tests hold the new one to the old one's selection, row for row, over the cases that differ:
items of the patient by photograph and by name only, other patients' items, and another clinic's
patient with the same id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, insert, or_, select, tuple_
from sqlalchemy.orm import Session

from core import repository as repo
from core import retention
from core.db import get_sessionmaker, session_scope
from core.tables import Image, Patient, ScoringJob, ScoringJobItem, new_id


def items_of_before(patient_ids: Sequence[int]) -> ColumnElement[bool]:
    """The predicate as it was before the scale review: the reference the new one must agree with."""
    images = select(Image.id).where(Image.patient_id.in_(patient_ids))
    named = select(Patient.clinic_id, Patient.external_id).where(Patient.id.in_(patient_ids))
    return or_(
        ScoringJobItem.image_id.in_(images),
        exists().where(
            ScoringJob.id == ScoringJobItem.job_id,
            tuple_(ScoringJob.clinic_id, ScoringJobItem.patient_external_id).in_(named),
        ),
    )


@dataclass
class Jobs:
    """Patients (row ids) and the items expected to be each one's (item paths)."""

    patients: dict[str, int]  # "north P-1" -> patient id
    items: dict[str, set[tuple[str, str]]]  # "north P-1" -> its items, as (job id, path)


def build(url: str) -> Jobs:
    """North's P-1 (the patient erased) and P-2, South's P-1 (the same id) and P-3, and their
    clinics' folder jobs:

    - North's first job: P-1's photograph by photograph and name; P-1's file that failed (by name
      only); a photograph of P-1's whose file named no patient (by photograph only); P-2's
      photograph and failed file; a file naming no one (no photograph);
    - North's second job: P-1's photograph alone (the job an erasure of P-1 empties);
    - South's job: South's P-1 by photograph and name, and by name only; P-3's failed file; a file
      pointing at North's P-1's photograph (by photograph: whichever clinic's job it is in).
    """
    with session_scope(url) as s:
        north = repo.get_or_create_clinic(s, "North items").id
        south = repo.get_or_create_clinic(s, "South items").id
        patients = {
            f"{name} {ext}": repo.get_or_create_patient(s, clinic, ext).id
            for name, clinic, ext in (
                ("north", north, "P-1"),
                ("north", north, "P-2"),
                ("south", south, "P-1"),
                ("south", south, "P-3"),
            )
        }

        def photo(patient: str, n: int) -> str:
            clinic = north if patient.startswith("north") else south
            return repo.create_image(
                s,
                clinic_id=clinic,
                patient_id=patients[patient],
                eye="left",
                sha256=f"{n:064x}",
                stored_path=f"00/00/{n}.jpg",
                size_bytes=1,
            ).id

        t1, t2, t3, o1, s1 = (
            photo("north P-1", 1),
            photo("north P-1", 2),
            photo("north P-1", 3),
            photo("north P-2", 4),
            photo("south P-1", 5),
        )
        first = repo.create_job(s, north, "/exports/north").id
        second = repo.create_job(s, north, "/exports/north-2").id
        south_job = repo.create_job(s, south, "/exports/south").id
        rows = [
            (first, "P-1_left.jpg", "P-1", t1),
            (first, "P-1_right.jpg", "P-1", None),
            (first, "IMG_0001.jpg", None, t2),
            (first, "P-2_left.jpg", "P-2", o1),
            (first, "P-2_right.jpg", "P-2", None),
            (first, "notes.csv", None, None),
            (second, "P-1_left_2.jpg", "P-1", t3),
            (south_job, "P-1_left.jpg", "P-1", s1),
            (south_job, "P-1_right.jpg", "P-1", None),
            (south_job, "P-3_left.jpg", "P-3", None),
            (south_job, "copied.jpg", None, t1),
        ]
        for job, path, external_id, image_id in rows:
            status = "failed" if image_id is None else "done"
            s.add(
                ScoringJobItem(
                    job_id=job,
                    path=path,
                    patient_external_id=external_id,
                    eye="left",
                    image_id=image_id,
                    status=status,
                )
            )
    return Jobs(
        patients,
        {
            "north P-1": {
                (first, "P-1_left.jpg"),
                (first, "P-1_right.jpg"),
                (first, "IMG_0001.jpg"),
                (second, "P-1_left_2.jpg"),
                (south_job, "copied.jpg"),
            },
            "north P-2": {(first, "P-2_left.jpg"), (first, "P-2_right.jpg")},
            "south P-1": {(south_job, "P-1_left.jpg"), (south_job, "P-1_right.jpg")},
            "south P-3": {(south_job, "P-3_left.jpg")},
        },
    )


def _selected(session: Session, where: ColumnElement[bool]) -> set[tuple[str, str]]:
    """The items ``where`` selects, as (job id, path)."""
    rows = session.execute(select(ScoringJobItem.job_id, ScoringJobItem.path).where(where)).all()
    return {(job, path) for job, path in rows}


#: The patients erased together, by the keys of ``Jobs.patients``.
ERASED_TOGETHER = [
    ["north P-1"],
    ["north P-2"],
    ["south P-1"],
    ["south P-3"],
    ["north P-1", "north P-2"],
    ["north P-1", "south P-1"],
    ["north P-1", "north P-2", "south P-1", "south P-3"],
    [],
]


def test_the_items_of_erased_patients_are_the_ones_they_were_before(url: str) -> None:
    jobs = build(url)
    with session_scope(url) as s:
        everything = _selected(s, ScoringJobItem.id.isnot(None))
        for names in ERASED_TOGETHER:
            ids = [jobs.patients[n] for n in names]
            expected: set[tuple[str, str]] = set().union(*(jobs.items[n] for n in names))
            assert _selected(s, items_of_before(ids)) == expected, names  # the reference agrees
            assert _selected(s, retention._items_of(ids)) == expected, names
            # the jobs that lose items, and those left with none, as an erasure counts them
            assert retention._jobs_emptied(s, retention._items_of(ids)) == retention._jobs_emptied(
                s, items_of_before(ids)
            )
    session = get_sessionmaker(url)()
    try:  # and the DELETE deletes exactly them
        ids = [jobs.patients["north P-1"]]
        stmt = delete(ScoringJobItem).where(retention._items_of(ids))
        session.execute(stmt.execution_options(synchronize_session=False))
        assert _selected(session, ScoringJobItem.id.isnot(None)) == everything - jobs.items["north P-1"]
    finally:
        session.rollback()
        session.close()


def _vm_steps(session: Session, where: ColumnElement[bool]) -> int:
    """SQLite virtual-machine instructions (in tens) to count the items ``where`` selects: a
    measure of work that does not depend on the machine's speed."""
    raw: Any = session.connection().connection.driver_connection
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    raw.set_progress_handler(tick, 10)
    try:
        session.scalar(select(func.count()).select_from(ScoringJobItem).where(where))
    finally:
        raw.set_progress_handler(None, 10)
    return steps[0]


def other_items(url: str, clinic: str, first: int, count: int) -> None:
    """``count`` more items of another patient's (one in two with a photograph), in jobs of 500."""
    with session_scope(url) as s:
        clinic_id = repo.get_or_create_clinic(s, clinic).id
        patient = repo.get_or_create_patient(s, clinic_id, "OTHER").id
        jobs = [
            repo.create_job(s, clinic_id, f"/exports/more-{n}").id for n in range(first, first + count, 500)
        ]
        numbers = range(first, first + count)
        images = {n: new_id() for n in numbers if n % 2}
        s.execute(
            insert(Image),
            [
                {
                    "id": image_id,
                    "clinic_id": clinic_id,
                    "patient_id": patient,
                    "eye": "left",
                    "sha256": f"{n:064x}",
                    "stored_path": f"00/00/{n}.jpg",
                    "size_bytes": 1,
                    "status": "done",
                }
                for n, image_id in images.items()
            ],
        )
        s.execute(
            insert(ScoringJobItem),
            [
                {
                    "job_id": jobs[(n - first) // 500],
                    "path": f"O-{n}_left.jpg",
                    "patient_external_id": f"O-{n}",
                    "eye": "left",
                    "image_id": images.get(n),
                    "status": "done",
                }
                for n in numbers
            ],
        )


def test_the_items_of_an_erased_patient_are_found_without_reading_every_job(url: str) -> None:
    """The erasure's look for its items read every item of every job (and ran a correlated query
    for each): its work grew with the whole history, not with the patient's own items."""
    jobs = build(url)
    ids = [jobs.patients["north P-1"]]
    other_items(url, "North items", 0, 200)
    with session_scope(url) as s:
        few = _vm_steps(s, retention._items_of(ids))
        before_few = _vm_steps(s, items_of_before(ids))
    other_items(url, "North items", 200, 2000)
    with session_scope(url) as s:
        many = _vm_steps(s, retention._items_of(ids))
        before_many = _vm_steps(s, items_of_before(ids))
    assert before_many > 5 * before_few  # what the test tells apart: the old look's work grew
    assert many < 2 * few, (few, many)  # the same, give or take a deeper B-tree
