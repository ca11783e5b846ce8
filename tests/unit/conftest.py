"""Fixtures of the API tests: a migrated embedded database (the client of the real app on it is
tests/conftest.py's).

Modules with their own ``url`` fixture (a bare SQLite file, no settings) override it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core import migrate
from core.settings import get_settings


@pytest.fixture
def url(isolated_settings: Path) -> str:
    db_url = get_settings().database_url
    migrate.upgrade(db_url)
    return db_url
