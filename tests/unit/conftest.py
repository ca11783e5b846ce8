"""Fixtures of the API tests: a migrated embedded database and a client of the real app.

Modules with their own ``url`` fixture (a bare SQLite file, no settings) override it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core import migrate
from core.settings import get_settings
from services.app import create_app
from services.config import get_api_settings


@pytest.fixture
def url(isolated_settings: Path) -> str:
    db_url = get_settings().database_url
    migrate.upgrade(db_url)
    return db_url


@pytest.fixture
def client(url: str) -> Iterator[TestClient]:
    get_api_settings.cache_clear()
    with TestClient(create_app()) as c:
        yield c
    get_api_settings.cache_clear()
