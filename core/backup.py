"""Backups of the database and the photograph store, taken while the service runs, and restores.

A backup folder holds:

- ``database.sqlite`` (SQLite's online backup API: a consistent copy while the API and workers
  write) or ``database.pgdump`` (``pg_dump`` in its custom format, from a snapshot exported by a
  transaction that also lists the snapshot's files);
- ``store/``: the stored files the snapshot names (photographs and heatmaps), in the store's own
  layout. The store is content-addressed and its files never change, so they are copied after
  the snapshot: every file it names is still there, unless erased in between (then listed as
  missing, and not needed by anyone but the erased patient's rows);
- ``store/deployment.key``: the deployment's secret (``core.deployment_key``), which is not in the
  database: without it a restored deployment could not match its erasure audit rows;
- ``backup.json``: when, the schema revision, and the counts.

The folder holds patients' photographs and the key: it is created readable by its owner only,
and belongs wherever the store itself may be kept.

Taking a backup into a folder that holds one copies only the files it lacks (a file's name is its
content's sha256) and deletes the files the new snapshot no longer names: a patient erased since
the last backup leaves the backup with the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url

from core.deployment_key import KEY_FILE
from core.tables import utcnow

SQLITE_FILE = "database.sqlite"
PG_FILE = "database.pgdump"
STORE_DIR = "store"
MANIFEST = "backup.json"
#: Every column that names a file in the store (a new one must be added here: tested).
STORED_PATHS_SQL = "SELECT stored_path FROM image UNION SELECT stored_path FROM explanation"

Progress = Callable[[Iterable[str], int, str], Iterable[str]]


class BackupError(Exception):
    """A backup or restore that cannot be done, in one line for the operator."""


@dataclass
class BackupReport:
    folder: str
    database: str  # "sqlite" or "postgresql"
    revision: str | None
    taken_at: str
    files: int  # named by the snapshot
    copied: int = 0  # newly copied (backup) or put back (restore)
    kept: int = 0  # already in place
    pruned: int = 0  # no longer named by the snapshot, deleted from the backup
    missing: list[str] = field(default_factory=list)  # named, but not in the store
    key: str = "none"  # the deployment key: "copied", "kept", "replaced" or "none" (there was none)


def _no_progress(items: Iterable[str], _total: int, _what: str) -> Iterable[str]:
    return items


def _kind(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"backups support SQLite and PostgreSQL databases, not {backend}")
    return backend


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up")
    return Path(database)


def _libpq_url(url: str) -> str:
    """The URL as pg_dump / pg_restore take it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _revision(conn: Connection) -> str | None:
    try:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # no alembic_version table: an empty database
        return None


@contextmanager
def _temporary_in(folder: Path, suffix: str) -> Any:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _named_files(url: str) -> tuple[set[str], str | None]:
    """The stored files a database names, and its schema revision."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text(STORED_PATHS_SQL)).scalars()), _revision(conn)
    finally:
        engine.dispose()


def _snapshot_sqlite(url: str, folder: Path) -> tuple[set[str], str | None]:
    source = _sqlite_path(url)
    if not source.exists():
        raise BackupError(f"no SQLite database at {source}")
    with _temporary_in(folder, ".sqlite") as tmp:
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)  # one consistent copy, while others write
        named = _named_files(f"sqlite:///{tmp}")
        os.replace(tmp, folder / SQLITE_FILE)
    return named


def _snapshot_postgresql(url: str, folder: Path) -> tuple[set[str], str | None]:
    if shutil.which("pg_dump") is None:
        raise BackupError("pg_dump not found: install PostgreSQL's client (Debian: postgresql-client)")
    engine = create_engine(url)
    try:
        repeatable = engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with repeatable as conn, _temporary_in(folder, ".pgdump") as tmp:
            # pg_dump reads the very snapshot this transaction lists the files from
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            paths = set(conn.execute(text(STORED_PATHS_SQL)).scalars())
            revision = _revision(conn)
            dump = ["pg_dump", "--format=custom", "--no-owner", f"--snapshot={snapshot}", f"--file={tmp}"]
            done = subprocess.run([*dump, _libpq_url(url)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BackupError(f"pg_dump failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            conn.rollback()
            os.replace(tmp, folder / PG_FILE)
    finally:
        engine.dispose()
    return paths, revision


def _copy(source: Path, target: Path) -> None:
    """Copy through a temporary file renamed into place: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_in(target.parent, target.suffix) as tmp:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def _sync_files(
    report: BackupReport, names: set[str], source: Path, target: Path, progress: Progress
) -> None:
    """Copy each named file from ``source`` to ``target`` unless already there (the same size: a
    name is its content's sha256, a partial copy is never renamed into place)."""
    for relpath in progress(sorted(names), len(names), "files"):
        src, dst = source / relpath, target / relpath
        if dst.is_file() and (not src.is_file() or dst.stat().st_size == src.stat().st_size):
            report.kept += 1
        elif not src.is_file():
            report.missing.append(relpath)
        else:
            _copy(src, dst)
            report.copied += 1


def _sync_key(source: Path, target: Path) -> str:
    src, dst = source / KEY_FILE, target / KEY_FILE
    if not src.is_file():
        return "none"
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return "kept"
    replaced = dst.exists()
    _copy(src, dst)  # a temporary file of mkstemp: readable by its owner only, as the key was
    return "replaced" if replaced else "copied"


def _files_under(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def take_backup(folder: Path, url: str, store_root: Path, progress: Progress = _no_progress) -> BackupReport:
    """Back up the database at ``url`` and the files of ``store_root`` it names into ``folder``."""
    kind = _kind(url)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    snapshot = _snapshot_sqlite if kind == "sqlite" else _snapshot_postgresql
    names, revision = snapshot(url, folder)
    (folder / (PG_FILE if kind == "sqlite" else SQLITE_FILE)).unlink(missing_ok=True)
    taken = utcnow().isoformat()
    report = BackupReport(str(folder), kind, revision, taken, files=len(names))
    backup_store = folder / STORE_DIR
    _sync_files(report, names, store_root, backup_store, progress)
    report.key = _sync_key(store_root, backup_store)
    for stale in _files_under(backup_store) - names - {KEY_FILE}:
        (backup_store / stale).unlink()
        report.pruned += 1
    (folder / MANIFEST).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable {MANIFEST}: not a drscreen backup") from exc
    return manifest


def _restore_sqlite(folder: Path, url: str) -> None:
    target = _sqlite_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(folder / SQLITE_FILE)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)  # replaces every page of the target, in one transaction


def _restore_postgresql(folder: Path, url: str) -> None:
    if shutil.which("pg_restore") is None:
        raise BackupError("pg_restore not found: install PostgreSQL's client (Debian: postgresql-client)")
    restore = ["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction"]
    done = subprocess.run(
        [*restore, f"--dbname={_libpq_url(url)}", str(folder / PG_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(f"pg_restore failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def restore_backup(
    folder: Path, url: str, store_root: Path, progress: Progress = _no_progress
) -> BackupReport:
    """Put the backup in ``folder`` back: the database at ``url`` becomes the snapshot (whatever it
    held is replaced) and the snapshot's files are put in ``store_root`` where absent. Run it with
    the API and workers stopped."""
    manifest = read_manifest(folder)
    kind = _kind(url)
    if manifest.get("database") != kind:
        raise BackupError(f"the backup is of a {manifest.get('database')} database, the target is {kind}")
    dump = folder / (SQLITE_FILE if kind == "sqlite" else PG_FILE)
    if not dump.is_file():
        raise BackupError(f"{dump} is missing: the backup is incomplete")
    (_restore_sqlite if kind == "sqlite" else _restore_postgresql)(folder, url)
    names, revision = _named_files(url)
    taken = str(manifest.get("taken_at", ""))
    report = BackupReport(str(folder), kind, revision, taken, files=len(names))
    store_root.mkdir(parents=True, exist_ok=True)
    _sync_files(report, names, folder / STORE_DIR, store_root, progress)
    # the restored audit rows were keyed with the backup's key (a different one: another store)
    report.key = _sync_key(folder / STORE_DIR, store_root)
    return report
