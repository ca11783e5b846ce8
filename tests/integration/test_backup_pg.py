"""Backups and restores on real PostgreSQL (pg_dump from an exported snapshot, pg_restore): the
SQLite tests of tests/unit/test_backup.py run again here, each on a fresh database of its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core import backup
from core.db import session_scope
from core.tables import Image
from tests.unit.test_backup import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    _deployment,
    test_a_backup_restores_an_emptied_deployment,
    test_a_restore_puts_back_the_backups_deployment_key,
    test_a_second_backup_copies_only_new_files_and_drops_an_erased_patients,
)
from tests.unit.test_workers_scoring import add_images, photo


@pytest.fixture
def url(own_pg_url: str) -> str:
    return own_pg_url


def test_the_database_is_postgresql(url: str) -> None:
    assert url.startswith("postgresql")


def test_files_and_rows_come_from_one_snapshot_while_uploads_go_on(url: str, tmp_path: Path) -> None:
    """Uploads during the backup: every photograph row in the dump has its file in the backup, and
    the backup names no file of a row the dump lacks (one exported snapshot for both)."""
    store, _ids = _deployment(url)
    stop = threading.Event()

    def uploads() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            add_images(url, store, f"U{n}", [(f"u{n}.jpg", photo("19_left.jpg")[1] + n.to_bytes(4), "left")])

    writer = threading.Thread(target=uploads)
    writer.start()
    try:
        report = backup.take_backup(tmp_path / "b", url, store.root)
    finally:
        stop.set()
        writer.join()
    with session_scope(url) as s:
        assert int(s.scalar(select(func.count()).select_from(Image)) or 0) > 3  # uploads happened
    backup.restore_backup(tmp_path / "b", url, tmp_path / "restored-store")
    with session_scope(url) as s:
        rows = set(s.scalars(select(Image.stored_path)))
    in_backup = {
        p.relative_to(tmp_path / "b" / "store").as_posix() for p in (tmp_path / "b" / "store").rglob("*.jpg")
    }
    assert rows == in_backup and report.missing == []


def test_an_older_schemas_backup_restores_into_a_migrated_database(url: str, tmp_path: Path) -> None:
    """The review: pg_restore --clean dropped only what the dump held, and a table of the newer
    schema (web_session, with its foreign key to api_key) made the README's restore-then-upgrade
    fail on PostgreSQL; the target is now emptied in the restore's own transaction."""
    from alembic import command

    from core import migrate

    store, _ids = _deployment(url)
    command.downgrade(migrate.alembic_config(url), "-1")
    older = migrate.current_revision(url)
    backup.take_backup(tmp_path / "b", url, store.root)
    migrate.upgrade(url)
    restored = backup.restore_backup(tmp_path / "b", url, store.root)
    assert restored.revision == older and restored.missing == []
    migrate.upgrade(url)
    assert migrate.current_revision(url) != older
