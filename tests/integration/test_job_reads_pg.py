"""A folder job's read paths on real PostgreSQL: tests/unit/test_job_reads.py again (window
functions, ``count(*) FILTER``, the grade-shown rule's correlated subqueries and the batched IN
lists are planned and run by PostgreSQL here)."""

from __future__ import annotations

import pytest

from tests.unit.test_job_reads import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    test_a_jobs_patients_page_reads_a_bounded_number_of_statements,
    test_a_results_page_is_cut_in_sql_in_file_order,
    test_counts_and_grades_counted_in_sql_are_the_per_item_ones,
    test_failures_of_several_jobs_in_one_statement,
    test_the_batched_patients_list_is_the_per_patient_one,
    test_the_jobs_page_reads_the_same_statements_for_three_jobs_as_for_six,
)


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


def test_the_database_is_postgresql(url: str) -> None:
    assert url.startswith("postgresql+psycopg://")
