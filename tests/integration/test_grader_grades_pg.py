"""Graders' grades on real PostgreSQL: the API tests of tests/unit/test_grader_grades.py again (its
upsert is PostgreSQL's ON CONFLICT here), plus what only PostgreSQL's row locks decide: grades sent
at once for one photograph leave one row, and a grade recorded while the patient is being erased
either waits and goes with the patient or answers 404."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core import grader, retention
from core.db import get_sessionmaker, session_scope
from core.tables import AuditEvent, GraderGrade, Image, Patient
from tests.api_support import Key
from tests.unit.test_grader_grades import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    scored,
    test_a_grader_grade_is_recorded_shown_replaced_audited_and_deleted,
    test_a_retry_changes_nothing_and_the_missed_list_is_newest_first,
    test_agreement_estimates_over_all_photographs_from_the_sample,
    test_agreement_of_the_release_with_the_graders,
    test_another_clinics_photograph_cannot_be_graded_read_or_ungraded,
    test_bad_grader_grades_are_refused_and_change_nothing,
    test_by_default_each_photograph_is_compared_with_the_grade_its_result_reports,
    test_erasing_the_patient_erases_the_grader_grades,
    test_metrics_count_the_last_30_days_of_grader_grades_and_the_misses,
    test_the_grading_queue_lists_referrals_and_the_sample_blind,
    test_the_sample_is_the_share_asked_for_drawn_by_secret_keys_not_ids,
)


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


def test_the_database_is_postgresql(url: str) -> None:
    assert url.startswith("postgresql+psycopg://")


def test_grades_sent_at_once_for_one_photograph_leave_one_row(
    client: TestClient,
    url: str,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    north, _, ids = scored

    def send(i: int) -> int:
        body = {"grade": i % 5, "grader": f"Dr {i}"}
        return client.put(f"/v1/images/{ids[0]}/grader-grade", headers=north.headers, json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(24)))
    assert statuses == [200] * 24
    with session_scope(url) as s:
        rows = s.scalars(select(GraderGrade)).all()
        assert len(rows) == 1 and rows[0].image_id == ids[0]
        # each audit row names the grade it replaced: the one the row before it recorded (the
        # review: 154 of 199 did not, the previous grade being read before the image's lock)
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "grader_grade.record").order_by(AuditEvent.id)
        ).all()
        assert events and events[0].detail is not None and events[0].detail["previous"] is None
        for before, after in itertools.pairwise(events):
            assert after.detail is not None and before.detail is not None
            assert after.detail["previous"] == before.detail["grade"], (before.detail, after.detail)
        assert events[-1].detail is not None and events[-1].detail["grade"] == rows[0].grade


def test_a_grade_recorded_during_an_erasure_goes_with_the_patient(
    url: str,
    scored: tuple[Key, Key, list[str]],  # noqa: F811
) -> None:
    """The erasure holds the photograph's lock; the grade waits for it, then finds the photograph
    gone (None: the route answers 404) instead of failing on a foreign key or outliving it."""
    north, _, ids = scored
    eraser = get_sessionmaker(url)()
    try:
        outcome = retention.erase_patient(eraser, north.clinic_id, "P16", api_key_id=None, by="test")
        assert outcome.found
        result: dict[str, object] = {}

        def record() -> None:
            with session_scope(url) as s:
                image = s.get(Image, ids[0])
                assert image is not None  # read before the erasure commits
                result["row"] = grader.record(s, image, grade=3, grader="Dr A", api_key_id=None)

        writer = threading.Thread(target=record)
        writer.start()
        time.sleep(1.0)
        assert writer.is_alive(), "the grade did not wait for the erasure's lock"
        eraser.commit()
    finally:
        eraser.close()
    writer.join(timeout=30)
    assert "row" in result and result["row"] is None
    with session_scope(url) as s:
        assert s.scalars(select(GraderGrade)).all() == []
        assert s.scalar(select(Patient.id).where(Patient.external_id == "P16")) is None
