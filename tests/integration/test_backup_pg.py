"""Backups and restores on real PostgreSQL (pg_dump from an exported snapshot, pg_restore): the
SQLite tests of tests/unit/test_backup.py run again here, each on a fresh database of its own."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core import backup
from core.db import dispose_engines, session_scope
from core.tables import Image
from tests.unit.test_backup import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    _deployment,
    test_a_backup_restores_an_emptied_deployment,
    test_a_restore_checks_the_store_and_the_folder_before_the_database,
    test_a_restore_puts_back_the_backups_deployment_key,
    test_a_restore_refuses_a_target_in_use_and_then_resets_runtime_state,
    test_a_second_backup_copies_only_new_files_and_drops_an_erased_patients,
    test_another_deployments_backup_or_a_foreign_folder_is_refused,
)
from tests.unit.test_restore_ledger import (  # noqa: F401  (the restore ledger, on PostgreSQL)
    test_a_backup_carries_the_ledger_and_a_restore_merges_it,
    test_a_backups_copy_of_the_ledger_never_shrinks,
    test_a_committed_erasure_whose_confirmation_was_lost_is_still_done,
    test_a_patient_sent_again_after_a_restore_survives_the_next,
    test_an_erasure_the_backup_already_holds_is_not_done_again,
    test_an_erasure_whose_commit_failed_is_never_done_by_a_restore,
    test_an_older_backup_then_a_newer_one_keeps_what_the_newer_holds,
    test_an_older_schemas_backup_is_replayed_by_the_upgrade_after_its_restore,
    test_erasures_and_revocations_after_a_backup_are_done_again_by_its_restore,
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
    dispose_engines()
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
    dispose_engines()
    restored = backup.restore_backup(tmp_path / "b", url, store.root)
    assert restored.revision == older and restored.missing == []
    migrate.upgrade(url)
    assert migrate.current_revision(url) != older


def test_a_restore_refuses_while_another_session_uses_the_database(url: str, tmp_path: Path) -> None:
    """The drill: a restore while the API ran (no worker) exited 0, and uploads it had answered
    202 vanished. An API holds sessions on the database: pg_stat_activity shows them."""
    import psycopg

    store, _ids = _deployment(url)
    backup.take_backup(tmp_path / "b", url, store.root)
    dispose_engines()
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as api_like:
        api_like.execute("SELECT 1")
        with pytest.raises(backup.BackupError, match=r"the target is in use: 1 other session\(s\)"):
            backup.restore_backup(tmp_path / "b", url, store.root)
    assert backup.restore_backup(tmp_path / "b", url, store.root).files == 4


@pytest.mark.timeout(120)
def test_a_psql_that_stops_early_is_reported_not_waited_for(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: psql stopping at its first error left pg_restore blocked on a full pipe (a dump
    over 64 KiB), and the restore hung for ever."""
    from core.tables import AuditEvent

    store, _ids = _deployment(url)
    with session_scope(url) as s:  # a dump of a few hundred KiB
        s.add_all(AuditEvent(action="image.read", detail={"pad": "x" * 200, "n": n}) for n in range(3000))
    backup.take_backup(tmp_path / "b", url, store.root)
    assert (tmp_path / "b" / backup.PG_FILE).stat().st_size > 64 * 1024
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "psql").write_text("#!/bin/sh\necho 'psql: error: must be owner of schema public' >&2\nexit 3\n")
    (fake / "psql").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    dispose_engines()
    with pytest.raises(backup.BackupError, match="restoring the dump failed: psql: error: must be owner"):
        backup.restore_backup(tmp_path / "b", url, store.root)


def test_sessions_of_another_role_count_as_in_use(url: str, tmp_path: Path) -> None:
    """The review: without pg_read_all_stats, another role's sessions show no backend_type, and the
    API's sessions under its own role were not seen."""
    import psycopg

    store, _ids = _deployment(url)
    backup.take_backup(tmp_path / "b", url, store.root)
    dispose_engines()
    admin_url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    role = f"drs_api_{uuid.uuid4().hex[:8]}"
    database = admin_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
    try:
        owner = f"drs_owner_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE ROLE "{owner}" LOGIN')
            admin.execute(f'ALTER DATABASE "{database}" OWNER TO "{owner}"')
        owner_url = url.replace("//postgres@", f"//{owner}@", 1)
        api_url = admin_url.replace("//postgres@", f"//{role}@", 1)
        with psycopg.connect(api_url) as api_like:
            api_like.execute("SELECT 1")
            assert backup._in_use(owner_url, "postgresql") == "1 other session(s) on the database (the API?)"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" OWNER TO postgres')
            admin.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM "{role}"')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
            admin.execute(f'DROP ROLE IF EXISTS "{owner}"')
