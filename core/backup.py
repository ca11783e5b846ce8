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

Order, so that a backup interrupted at any point still restores what its manifest says: the new
snapshot is taken to a temporary file, its files are copied beside the previous backup's, then
the snapshot is renamed into place and the manifest written, and only then are the files the new
snapshot no longer names deleted (a patient erased since the last backup leaves it with this one).

The folder holds patients' photographs and the key: it and its files are readable by their owner
only, and it must not overlap the store it backs up.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
#: Emptied before a PostgreSQL dump is restored into it: pg_restore --clean drops only what the
#: dump holds, and a table a newer schema added (with a foreign key) then blocks the restore.
PG_EMPTY_SCHEMA = "DROP SCHEMA IF EXISTS public CASCADE;\nCREATE SCHEMA public;\n"

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
    pruned: int = 0  # backup: no longer named, deleted; restore: in the store, named by no row
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


def _pg_command(url: str) -> tuple[str, dict[str, str]]:
    """The URL as libpq tools take it, without its password (a command line is readable by every
    local user: ``ps``), and the environment carrying the password instead."""
    parsed = make_url(url).set(drivername="postgresql")
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    # URL.set() takes None as 'unchanged': the named tuple's own _replace drops the password
    return parsed._replace(password=None).render_as_string(hide_password=False), env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install PostgreSQL's client (Debian: postgresql-client)")
    return found


def _first_error(stderr: str) -> str:
    """The line that says what went wrong (the last lines of pg_restore and psql quote SQL)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return (errors or lines or ["?"])[0][:300]


def _revision(conn: Connection) -> str | None:
    try:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # no alembic_version table: an empty database
        return None


@contextmanager
def _temporary_in(folder: Path, suffix: str) -> Iterator[Path]:
    """A new empty file in ``folder`` (mode 0600: mkstemp's), deleted on exit unless renamed."""
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


def _snapshot_sqlite(url: str, target: Path) -> tuple[set[str], str | None]:
    source = _sqlite_path(url)
    if not source.is_file():
        raise BackupError(f"no SQLite database at {source}")
    try:
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)  # one consistent copy, while others write
            # the copy inherits the live database's WAL mode, which cannot be opened from a
            # read-only folder (a snapshot of the backup disk): a plain rollback journal instead
            dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the SQLite database at {source}: {exc}") from None
    return _named_files(f"sqlite:///{target}")


def _snapshot_postgresql(url: str, target: Path) -> tuple[set[str], str | None]:
    pg_dump = _tool("pg_dump")
    libpq_url, env = _pg_command(url)
    engine = create_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            # pg_dump reads the very snapshot this transaction lists the files from
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            named = set(conn.execute(text(STORED_PATHS_SQL)).scalars()), _revision(conn)
            dump = [pg_dump, "--format=custom", "--no-owner", f"--snapshot={snapshot}", f"--file={target}"]
            done = subprocess.run([*dump, libpq_url], capture_output=True, text=True, env=env, check=False)
            conn.rollback()
    finally:
        engine.dispose()
    if done.returncode != 0:
        raise BackupError(f"pg_dump failed: {_first_error(done.stderr)}")
    return named


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


def _stored_files_under(root: Path) -> set[str]:
    """The stored files under ``root`` (not the key, not temporary files of a copy or an upload)."""
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != KEY_FILE and not p.name.startswith(".")
    }


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _write_manifest(folder: Path, report: BackupReport) -> None:
    with _temporary_in(folder, ".json") as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)


def take_backup(folder: Path, url: str, store_root: Path, progress: Progress = _no_progress) -> BackupReport:
    """Back up the database at ``url`` and the files of ``store_root`` it names into ``folder``."""
    kind = _kind(url)
    backup_store = folder / STORE_DIR
    if _overlaps(folder, store_root) or _overlaps(backup_store, store_root):
        # its store would be the live one: pruning it would delete photographs being uploaded
        raise BackupError(f"the backup folder {folder} overlaps the store {store_root}: choose another")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # an existing folder too: it holds patients' photographs and the key
    dump_name = SQLITE_FILE if kind == "sqlite" else PG_FILE
    with _temporary_in(folder, Path(dump_name).suffix) as tmp:
        names, revision = (_snapshot_sqlite if kind == "sqlite" else _snapshot_postgresql)(url, tmp)
        report = BackupReport(str(folder), kind, revision, utcnow().isoformat(), files=len(names))
        _sync_files(report, names, store_root, backup_store, progress)
        report.key = _sync_key(store_root, backup_store)
        os.replace(tmp, folder / dump_name)
    (folder / (PG_FILE if kind == "sqlite" else SQLITE_FILE)).unlink(missing_ok=True)
    stale = _stored_files_under(backup_store) - names
    report.pruned = len(stale)
    _write_manifest(folder, report)
    for relpath in stale:
        (backup_store / relpath).unlink()
    return report


def read_manifest(folder: Path) -> dict[str, object]:
    try:
        manifest: dict[str, object] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable {MANIFEST}: not a drscreen backup") from exc
    return manifest


def _restore_sqlite(folder: Path, url: str) -> None:
    target = _sqlite_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # read only: the backup may be on a read-only disk or snapshot
        source = f"file:{folder / SQLITE_FILE}?mode=ro"
        with closing(sqlite3.connect(source, uri=True)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)  # replaces every page of the target, in one transaction
    except sqlite3.Error as exc:
        raise BackupError(f"cannot restore into the SQLite database at {target}: {exc}") from None


def _restore_postgresql(folder: Path, url: str) -> None:
    """The target emptied and the dump loaded in one transaction (psql --single-transaction): a
    failure leaves the database as it was."""
    pg_restore, psql = _tool("pg_restore"), _tool("psql")
    libpq_url, env = _pg_command(url)
    script = subprocess.run(
        [pg_restore, "--no-owner", "--file=-", str(folder / PG_FILE)],
        capture_output=True,
        env=env,
        check=False,
    )
    if script.returncode != 0:
        raise BackupError(f"pg_restore failed: {_first_error(script.stderr.decode(errors='replace'))}")
    load = [
        psql,
        "--no-psqlrc",
        "--quiet",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={libpq_url}",
    ]
    done = subprocess.run(
        load, input=PG_EMPTY_SCHEMA.encode() + script.stdout, capture_output=True, env=env, check=False
    )
    if done.returncode != 0:
        raise BackupError(f"restoring the dump failed: {_first_error(done.stderr.decode(errors='replace'))}")


def restore_backup(
    folder: Path,
    url: str,
    store_root: Path,
    progress: Progress = _no_progress,
    *,
    remove_unnamed: bool = False,
) -> BackupReport:
    """Put the backup in ``folder`` back: the database at ``url`` becomes the snapshot (whatever it
    held is replaced) and the snapshot's files are put in ``store_root`` where absent. Files of the
    store that no restored row names (photographs sent after the backup) are counted in
    ``pruned``, and deleted with ``remove_unnamed``. Run it with the API and workers stopped."""
    manifest = read_manifest(folder)
    kind = _kind(url)
    if manifest.get("database") != kind:
        raise BackupError(f"the backup is of a {manifest.get('database')} database, the target is {kind}")
    dump = folder / (SQLITE_FILE if kind == "sqlite" else PG_FILE)
    if not dump.is_file():
        raise BackupError(f"{dump} is missing: the backup is incomplete")
    (_restore_sqlite if kind == "sqlite" else _restore_postgresql)(folder, url)
    names, revision = _named_files(url)
    report = BackupReport(str(folder), kind, revision, str(manifest.get("taken_at", "")), files=len(names))
    store_root.mkdir(parents=True, exist_ok=True)
    _sync_files(report, names, folder / STORE_DIR, store_root, progress)
    # the restored audit rows were keyed with the backup's key (a different one: another store)
    report.key = _sync_key(folder / STORE_DIR, store_root)
    unnamed = _stored_files_under(store_root) - names
    report.pruned = len(unnamed)
    if remove_unnamed:
        for relpath in unnamed:
            (store_root / relpath).unlink()
    return report
