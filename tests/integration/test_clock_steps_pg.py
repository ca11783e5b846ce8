"""tests/unit/test_clock_steps.py's clocks on real PostgreSQL (a fresh database per test): which
result is a patient's and which release is active do not follow the machines' wall clocks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from core.store import FileStore
from tests.unit.test_clock_steps import newer_result_of_a_clock_behind, rollback_from_a_clock_behind

pytestmark = pytest.mark.integration


def test_a_newer_result_from_a_clock_behind_is_the_patients_result_pg(
    own_pg_url: str, tmp_path: Path, shifted_clock: Callable[[str, timedelta], None]
) -> None:
    newer_result_of_a_clock_behind(own_pg_url, FileStore(tmp_path / "store"), shifted_clock)


def test_a_rollback_from_a_clock_behind_is_the_active_release_pg(
    own_pg_url: str,
    shifted_clock: Callable[[str, timedelta], None],
) -> None:
    rollback_from_a_clock_behind(own_pg_url, shifted_clock)
