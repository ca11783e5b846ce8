"""Reads the scale review found scanning whole tables on PostgreSQL, and the indexes that answer
them (migration 29b2a1e6552c): each test runs drscreen's own code, catches the statements it
sends, and asks PostgreSQL how it runs them (EXPLAIN, with the same parameters, on a few thousand
rows, analysed). Also the SQLite tests of tests/unit/test_erasure_items.py, on PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from core import deployment_key, retention
from core import repository as repo
from core.db import get_engine, get_sessionmaker, session_scope
from core.tables import Patient, PatientResult, as_utc, utcnow
from services.web import home
from tests.unit.test_erasure_items import (  # noqa: F401  (collected here: the same test on PostgreSQL)
    build,
    other_items,
    test_the_items_of_erased_patients_are_the_ones_they_were_before,
)


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


def _sent(url: str, run: Callable[[Session], Any], pattern: str) -> list[tuple[str, Any]]:
    """The statements matching ``pattern`` that ``run`` sends (with their parameters), in a
    transaction rolled back after."""
    engine = get_engine(url)
    sent: list[tuple[str, Any]] = []

    def catch(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if re.search(pattern, statement, re.S):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", catch)
    session = get_sessionmaker(url)()
    try:
        run(session)
    finally:
        event.remove(engine, "before_cursor_execute", catch)
        session.rollback()
        session.close()
    return sent


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _plan(url: str, statement: str, parameters: Any) -> list[dict[str, Any]]:
    """The plan's nodes (a DELETE is planned, not run)."""
    with get_engine(url).connect() as conn:
        [[explained]] = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).all()
        conn.rollback()
    return list(_nodes(explained[0]["Plan"]))


def _analyse(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def _indexes_used(nodes: list[dict[str, Any]]) -> set[str]:
    return {str(node["Index Name"]) for node in nodes if "Index Name" in node}


def _scanned_whole(nodes: list[dict[str, Any]]) -> set[str]:
    return {str(node["Relation Name"]) for node in nodes if node["Node Type"] == "Seq Scan"}


def test_an_erasure_finds_the_folder_job_files_of_its_patient_by_index(url: str, tmp_path: Path) -> None:
    """The erasure's two looks at the items (the jobs they empty, then the DELETE) read every item
    of every job and ran a correlated query for each (1.3 s each at 120,000 items)."""
    build(url)
    other_items(url, "North items", 0, 4000)
    _analyse(url)
    deployment_key.deployment_key(tmp_path)  # the store the erasure's ledger line would go to
    with session_scope(url) as s:
        north = repo.get_or_create_clinic(s, "North items").id
    sent = _sent(
        url,
        lambda s: retention.erase_patient(s, north, "P-1", force=True, store_dir=tmp_path),
        r"scoring_job_item_1\.patient_external_id",
    )
    assert [statement.split()[0] for statement, _ in sent] == ["SELECT", "DELETE"]
    for statement, parameters in sent:
        nodes = _plan(url, statement, parameters)
        assert "ix_scoring_job_item_patient_external_id_job_id" in _indexes_used(nodes), statement
        assert "scoring_job_item" not in _scanned_whole(nodes), statement


def _results(url: str, clinic: str, patients: int) -> int:
    """``patients`` patients of ``clinic`` with eight results each over three years, the newest
    current and one in three referable; one in twenty recorded in the last days. Returns the
    clinic's id."""
    now = utcnow()
    with session_scope(url) as s:
        clinic_id = repo.get_or_create_clinic(s, clinic).id
        ids = [repo.get_or_create_patient(s, clinic_id, f"R-{n}").id for n in range(patients)]
        rows = []
        for n, patient_id in enumerate(ids):
            for k in range(8):
                newest = k == 7
                at = now - timedelta(days=2 if newest and n % 20 == 0 else 1000 - 120 * k - n % 100)
                rows.append(
                    {
                        "patient_id": patient_id,
                        "grade": 2 if (n + k) % 3 == 0 else 0,
                        "gradable": True,
                        "referable": (n + k) % 3 == 0,
                        "is_current": newest,
                        "computed_at": at,
                    }
                )
        s.execute(insert(PatientResult), rows)
    return clinic_id


def test_the_home_pages_patients_to_refer_are_read_from_the_partial_index(url: str) -> None:
    """The home page's "patients to refer" read every current result of the history (70 ms at
    200,000 results). The partial index serves it only when the query's WHERE implies the
    index's: PostgreSQL did not use one declared ``WHERE is_current AND referable``."""
    north = _results(url, "North", 600)
    _results(url, "South", 200)
    _analyse(url)
    sent = _sent(url, lambda s: home._to_refer(s, north), r"FROM patient_result")
    [(statement, parameters)] = sent
    nodes = _plan(url, statement, parameters)
    assert "ix_patient_result_computed_at_refers_now" in _indexes_used(nodes), nodes
    assert "patient_result" not in _scanned_whole(nodes)
    with session_scope(url) as s:  # and it lists whom it did
        listed = [row["patient_id"] for row in home._to_refer(s, north)]
        rows = s.execute(
            select(Patient.external_id, PatientResult)
            .join(PatientResult, PatientResult.patient_id == Patient.id)
            .where(Patient.clinic_id == north)
            .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
        ).all()
    since = utcnow() - timedelta(days=7)
    expected = [ext for ext, r in rows if r.is_current and r.referable and as_utc(r.computed_at) > since]
    assert listed == expected and expected


def test_a_patients_results_are_read_in_recorded_order_by_index_without_statistics(url: str) -> None:
    """A patient's results are taken in the order they were recorded (by id: the time review).
    Ordered by id over the index on (patient_id, computed_at), PostgreSQL without statistics (after
    a restore) walked the primary key backwards through every newer patient's results."""
    _results(url, "North", 600)
    with session_scope(url) as s:
        patient = repo.get_patient(s, repo.get_or_create_clinic(s, "North").id, "R-5")
        assert patient is not None
        patient_id = patient.id

    def read(s: Session) -> None:
        repo.patient_history(s, patient_id)
        repo.get_current_patient_result(s, patient_id)
        repo.newest_patient_results(s, [patient_id])

    sent = _sent(url, read, r"FROM patient_result")
    assert len(sent) == 3
    for statement, parameters in sent:
        nodes = _plan(url, statement, parameters)
        assert "ix_patient_result_patient_id_id" in _indexes_used(nodes), (statement, nodes)
        assert "patient_result" not in _scanned_whole(nodes), statement
