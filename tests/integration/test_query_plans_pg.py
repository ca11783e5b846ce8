"""Reads the scale review found scanning whole tables on PostgreSQL, and the indexes that answer
them (migration 29b2a1e6552c): each test runs drscreen's own code, catches the statements it
sends, and asks PostgreSQL how it runs them (EXPLAIN, with the same parameters, on a few thousand
rows, analysed). Also the SQLite tests of tests/unit/test_erasure_items.py, on PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from core import deployment_key, retention
from core import repository as repo
from core.db import get_engine, get_sessionmaker, session_scope
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
