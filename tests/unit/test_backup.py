"""Backups and restores of the embedded deployment (SQLite and the file store), through the CLI an
operator runs; PostgreSQL's pg_dump / pg_restore path is tests/integration/test_backup_pg.py."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from cli.main import app
from core import backup, retention
from core import repository as repo
from core.db import dispose_engines, get_engine, session_scope
from core.deployment_key import KEY_FILE
from core.settings import get_settings
from core.store import FileStore
from core.tables import ApiKey, Base, Explanation, Image, Patient, WebSession, WorkerHeartbeat, as_utc, utcnow
from tests.api_support import make_key
from tests.unit.test_workers_scoring import add_images, photo

runner = CliRunner()


def _deployment(url: str) -> tuple[FileStore, list[str]]:
    """Two patients' photographs, one with a heatmap, and the deployment key."""
    store = FileStore(get_settings().store_path)
    ids = add_images(url, store, "A1", [photo("16_left.jpg"), photo("16_right.jpg")])
    ids += add_images(url, store, "B2", [photo("17_left.jpg")])
    heat = store.put_bytes(b"\x89PNG not really a heatmap", "png")
    with session_scope(url) as s:
        version = repo.get_or_create_model_version(s, "drscreen-ensemble@9.9.9")
        s.add(
            Explanation(
                image_id=ids[0], model_version_id=version.id, sha256=heat.sha256, stored_path=heat.relpath
            )
        )
    retention.store_key()  # created on first use, as a worker's start does
    return store, ids


def _names(url: str) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(select(Image.stored_path))) | set(s.scalars(select(Explanation.stored_path)))


def _lose_database(url: str) -> None:
    dispose_engines()
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).unlink()
        return
    with get_engine(url).begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    dispose_engines()


def test_every_column_naming_a_stored_file_is_backed_up() -> None:
    """A new table or column holding a store path would be left out of every backup silently."""
    named = {
        (table.name, column.name)
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if column.name.endswith("_path") and column.name != "path"
    }
    assert named == {("image", "stored_path"), ("explanation", "stored_path")}
    assert all(f"FROM {t}" in backup.STORED_PATHS_SQL for t, _ in named)


def test_a_backup_restores_an_emptied_deployment(url: str, tmp_path: Path) -> None:
    store, ids = _deployment(url)
    names = _names(url)
    assert len(names) == 4
    folder = tmp_path / "backups" / "monday"
    taken = runner.invoke(app, ["db", "backup", str(folder)])
    assert taken.exit_code == 0, taken.output
    assert "4 stored files: 4 copied, 0 already there" in taken.output
    manifest = json.loads((folder / backup.MANIFEST).read_text())
    assert (
        manifest["database"] == url.split(":")[0].split("+")[0]
        and manifest["files"] == 4
        and manifest["key"] == "copied"
    )
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / backup.MANIFEST).stat().st_mode) == 0o600
    assert {
        p.relative_to(folder / "store").as_posix() for p in (folder / "store").rglob("*") if p.is_file()
    } == (names | {KEY_FILE})
    key = (store.root / KEY_FILE).read_bytes()

    # the machine is lost: database and store gone
    _lose_database(url)
    for path in sorted(store.root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    refused = runner.invoke(app, ["db", "restore", str(folder)], input="n\n")
    assert refused.exit_code == 1 and "nothing restored" in refused.output

    restored = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert restored.exit_code == 0, restored.output
    assert "4 stored files: 4 copied" in restored.output
    assert _names(url) == names
    assert all(store.path(n).read_bytes() == (folder / "store" / n).read_bytes() for n in names)
    assert (store.root / KEY_FILE).read_bytes() == key
    with session_scope(url) as s:
        assert sorted(s.scalars(select(Image.id))) == sorted(ids)
    assert "alembic_version" in inspect(get_engine(url)).get_table_names()


def test_a_second_backup_copies_only_new_files_and_drops_an_erased_patients(url: str, tmp_path: Path) -> None:
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    erased = add_images(url, store, "C3", [photo("19_left.jpg")])
    with session_scope(url) as s:
        [stored] = s.scalars(select(Image.stored_path).where(Image.id == erased[0]))
    again = runner.invoke(app, ["db", "backup", str(folder)])
    assert again.exit_code == 0 and "1 copied, 4 already there" in again.output, again.output
    assert (folder / "store" / stored).is_file()

    with session_scope(url) as s:
        clinic = repo.get_clinic_by_name(s, "North")
        assert clinic is not None
        outcome = retention.erase_patient(s, clinic.id, "C3", force=True)
    with session_scope(url) as s:
        assert retention.remove_unreferenced_files(s, store, outcome.files) == 1
    third = runner.invoke(app, ["db", "backup", str(folder)])
    assert (
        third.exit_code == 0
        and "1 file(s) no longer named by the database removed from the backup" in third.output
    ), third.output
    assert not (folder / "store" / stored).exists()  # the erased patient's photograph left the backup


def test_a_restore_puts_back_the_backups_deployment_key(url: str, tmp_path: Path) -> None:
    """The erasure audit rows are keyed with the deployment key, which is not in the database: a
    restore into a store with another key must bring the backup's."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    key = (store.root / KEY_FILE).read_bytes()
    (store.root / KEY_FILE).write_bytes(b"0" * len(key))
    dispose_engines()  # the service stopped: no session of ours left on the database
    restored = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert restored.exit_code == 0 and "deployment key was replaced" in restored.output, restored.output
    assert (store.root / KEY_FILE).read_bytes() == key


def test_backup_and_restore_refuse_what_they_cannot_do_in_one_line(url: str, tmp_path: Path) -> None:
    not_a_backup = runner.invoke(app, ["db", "restore", str(tmp_path), "--yes"])
    assert not_a_backup.exit_code == 2 and "not a drscreen backup" in not_a_backup.output
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    (folder / backup.SQLITE_FILE).unlink()
    incomplete = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert incomplete.exit_code == 2 and "the backup is incomplete" in incomplete.output
    with pytest.raises(backup.BackupError, match="of a sqlite database, the target is postgresql"):
        backup.restore_backup(folder, "postgresql+psycopg://nobody@127.0.0.1:1/none", tmp_path / "s")


def test_a_backup_folder_overlapping_the_store_is_refused(url: str, tmp_path: Path) -> None:
    """The review: `db backup $DRSCREEN_VAR_DIR` made the live store the backup's store, and the
    prune deleted the photograph of an upload committed after the snapshot."""
    store, _ids = _deployment(url)
    in_flight = store.put_bytes(b"an upload after the snapshot", "jpg")
    var = store.root.parent
    for folder in (var, store.root, store.root / "backups", var.parent):
        refused = runner.invoke(app, ["db", "backup", str(folder)])
        assert refused.exit_code == 2 and "overlaps the store" in refused.output, (folder, refused.output)
    assert in_flight.path.is_file()


def test_an_interrupted_backup_still_restores_what_its_manifest_says(url: str, tmp_path: Path) -> None:
    """The review: the new snapshot was renamed into place before its files were copied, so a
    backup interrupted halfway restored a database naming files the backup lacked."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    first = backup.take_backup(folder, url, store.root)
    add_images(url, store, "LATE", [photo("19_left.jpg")])

    def interrupted(items: Any, _total: int, _what: str) -> Any:
        for n, item in enumerate(items):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        backup.take_backup(folder, url, store.root, interrupted)
    assert backup.read_manifest(folder)["taken_at"] == first.taken_at
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    _lose_database(url)
    shutil.rmtree(store.root)
    restored = backup.restore_backup(folder, url, store.root)
    assert restored.missing == [] and restored.files == first.files == 4


def test_the_sqlite_copy_opens_read_only_and_restore_reports_newer_files(url: str, tmp_path: Path) -> None:
    """The review: the copy kept the live database's WAL mode, which a read-only snapshot of the
    backup disk cannot open; and a restore left photographs sent after the backup unmentioned."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    with closing(sqlite3.connect(f"file:{folder / backup.SQLITE_FILE}?mode=ro", uri=True)) as copy:
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    add_images(url, store, "LATE", [photo("19_left.jpg")])
    dispose_engines()
    kept = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert kept.exit_code == 0 and "1 file(s) of the store are named by no restored row" in kept.output
    dispose_engines()
    removed = runner.invoke(app, ["db", "restore", str(folder), "--yes", "--remove-unnamed"])
    assert (
        removed.exit_code == 0 and "1 file(s) of the store named by no restored row deleted" in removed.output
    )
    assert {p.name for p in store.root.rglob("*.jpg")} == {
        Path(n).name for n in _names(url) if n.endswith(".jpg")
    }


def test_a_postgresql_password_stays_off_the_command_line() -> None:
    """The review: pg_dump's command line (readable by every local user) carried the password."""
    command, env = backup._pg_command("postgresql+psycopg://drs:S3cr%25t%23pw@db.example:5432/drscreen")
    assert command == "postgresql://drs@db.example:5432/drscreen"
    assert env["PGPASSWORD"] == "S3cr%t#pw"


def test_another_deployments_backup_or_a_foreign_folder_is_refused(url: str, tmp_path: Path) -> None:
    """The drill: a backup from another deployment (a cron job without DRSCREEN_DATABASE_URL) into
    a folder holding a backup pruned that backup to nothing, exit 0."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    (store.root / KEY_FILE).write_text("ab" * 32 + "\n")  # another deployment's store
    refused = runner.invoke(app, ["db", "backup", str(folder)])
    assert refused.exit_code == 2 and "holds another deployment's backup (deployment key" in refused.output
    assert len(list((folder / "store").rglob("*.jpg"))) == 3  # untouched
    (store.root / KEY_FILE).unlink()  # a store with no key yet (no worker ever ran) is another one too
    refused = runner.invoke(app, ["db", "backup", str(folder)])
    assert refused.exit_code == 2 and "this store's is none" in refused.output, refused.output
    assert runner.invoke(app, ["db", "backup", str(folder), "--force"]).exit_code == 0
    foreign = tmp_path / "shared"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's")
    refused = runner.invoke(app, ["db", "backup", str(foreign)])
    assert refused.exit_code == 2 and "is not empty and holds no backup.json" in refused.output
    assert (foreign / "notes.txt").read_text() == "someone's"


def test_a_failed_first_backup_leaves_no_folder(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path(url.removeprefix("sqlite:///")).unlink()
    folder = tmp_path / "new" / "backup"
    failed = runner.invoke(app, ["db", "backup", str(folder)])
    assert failed.exit_code == 2 and "no SQLite database at" in failed.output
    assert not folder.exists()


def test_a_restore_refuses_a_target_in_use_and_then_resets_runtime_state(url: str, tmp_path: Path) -> None:
    """The drill: a restore while workers ran exited 0, and uploads answered 202 vanished; after a
    restore, photographs waiting at the snapshot sat for a sweep period or more on the new broker,
    and the lost machine's worker looked alive."""
    _store, ids = _deployment(url)
    now = utcnow()
    beat = {"host": "old-machine", "pid": 1, "started_at": now, "seen_at": now, "interval_s": 30.0}
    key_id = make_key(url, "North").key_id
    with session_scope(url) as s:
        repo.record_heartbeat(s, "worker@old-machine", beat)
        repo.create_web_session(s, s.get_one(ApiKey, key_id))
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    dispose_engines()
    busy = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert (
        busy.exit_code == 2 and "the target is in use: 1 live worker(s) (worker@old-machine)" in busy.output
    )
    forced = runner.invoke(app, ["db", "restore", str(folder), "--yes", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "3 photograph(s) or folder job(s) were waiting" in forced.output
    assert "done again from the restore ledger" in forced.output
    with session_scope(url) as s:
        assert s.scalars(select(WorkerHeartbeat)).all() == [] and s.scalars(select(WebSession)).all() == []
        waiting = s.scalars(select(Image).where(Image.id.in_(ids))).all()
        assert {as_utc(i.updated_at).year for i in waiting} == {2000}  # the next sweep sends them


def test_a_restore_checks_the_store_and_the_folder_before_the_database(url: str, tmp_path: Path) -> None:
    """The drill: a store it could not write to left a half-restored machine (database replaced,
    no photographs, a traceback); a backup inside the store was deleted by --remove-unnamed."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    add_images(url, store, "LATE", [photo("19_left.jpg")])
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store should be")
    dispose_engines()
    with pytest.raises(backup.BackupError, match="cannot write to the store"):
        backup.restore_backup(folder, url, blocked)
    assert "LATE" in {p for p in _patients(url)}  # the database was not touched
    inside = store.root / "old-backup"
    shutil.copytree(folder, inside)
    with pytest.raises(backup.BackupError, match="overlaps the store"):
        backup.restore_backup(inside, url, store.root, remove_unnamed=True)
    assert (inside / backup.MANIFEST).is_file()


def _patients(url: str) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(select(Patient.external_id)))


def test_a_damaged_backup_is_found_by_verify_and_not_restored(url: str, tmp_path: Path) -> None:
    """Bit rot on the backup disk: a backup only compared sizes, and a restore put damaged
    photographs back as if whole. Stored files are named by their sha256, so both can tell."""
    store, _ids = _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    whole = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert whole.exit_code == 0 and "is whole: 4 stored file(s) checked" in whole.output, whole.output
    victim = sorted((folder / "store").rglob("*.jpg"))[0]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF  # the same size: the backup's own size check cannot see it
    victim.write_bytes(bytes(data))
    damaged = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert damaged.exit_code == 1 and f"DAMAGED: {victim.relative_to(folder / 'store')}" in damaged.output
    assert "1 of 4 stored file(s) damaged" in damaged.output

    _lose_database(url)
    shutil.rmtree(store.root)
    restored = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert restored.exit_code == 0 and "WARNING: 1 file(s) of the backup are damaged" in restored.output
    relpath = victim.relative_to(folder / "store")
    assert not (store.root / relpath).exists()  # not put back as if whole
    assert len(list(store.root.rglob("*.jpg"))) == 2

    (folder / backup.SQLITE_FILE).unlink()
    broken = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert broken.exit_code == 1 and "PROBLEM: database.sqlite is missing or empty" in broken.output


def test_a_damaged_dump_is_found_by_verify_and_refused_before_the_database_is_touched(
    url: str, tmp_path: Path
) -> None:
    """The documentation check: verify-backup called a backup with a corrupt database copy whole,
    and its restore replaced a working database with it (a traceback, a broken deployment)."""
    _deployment(url)
    folder = tmp_path / "backup"
    assert runner.invoke(app, ["db", "backup", str(folder)]).exit_code == 0
    dump = folder / backup.SQLITE_FILE
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    checked = runner.invoke(app, ["db", "verify-backup", str(folder)])
    assert checked.exit_code == 1 and "PROBLEM: database.sqlite is damaged" in checked.output
    before = _names(url)
    dispose_engines()
    refused = runner.invoke(app, ["db", "restore", str(folder), "--yes"])
    assert refused.exit_code == 2 and "is damaged" in refused.output and "nothing restored" in refused.output
    assert _names(url) == before


def test_two_deployments_without_keys_are_told_apart_by_their_database(url: str, tmp_path: Path) -> None:
    """The documentation check: with no deployment key yet on either side, another deployment's
    backup into the folder replaced it without a word."""
    _deployment(url)
    store_root = FileStore(get_settings().store_path).root
    (store_root / KEY_FILE).unlink()  # no worker, no erasure yet: no key
    folder = tmp_path / "backup"
    assert backup.take_backup(folder, url, store_root).key_fingerprint == "none"
    other = tmp_path / "other.db"
    shutil.copyfile(url.removeprefix("sqlite:///"), other)
    with pytest.raises(backup.BackupError, match="holds another deployment's backup \\(database sqlite:"):
        backup.take_backup(folder, f"sqlite:///{other}", tmp_path / "other-store")
    assert backup.take_backup(folder, url, store_root).files == 4  # the same deployment again: fine
