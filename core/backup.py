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
- ``store/ledger.jsonl``: the store's ledger of erasures and key revocations (core.ledger),
  copied after the snapshot;
- ``backup.json``: when, the schema revision, and the counts.

Order, so that a backup interrupted at any point still restores what its manifest says: the new
snapshot is taken to a temporary file, its files are copied beside the previous backup's, then
the snapshot is renamed into place and the manifest written, and only then are the files the new
snapshot no longer names deleted (a patient erased since the last backup leaves it with this one).

The folder holds patients' photographs and the key: it and its files are readable by their owner
only, and it must not overlap the store it backs up. A folder that holds something else, or
another deployment's backup (another database kind or deployment key), is refused: the prune
would delete that backup.

A restore refuses while workers are alive or (PostgreSQL) other sessions use the database, unless
forced: what they accepted meanwhile would vanish. After it, runtime state of the old machine is
dropped (worker heartbeats, web sessions: staff sign in again) and what was waiting at the
snapshot is marked stale, so the workers' next sweep sends it again on the new broker. Then the
erasures and key revocations made after the snapshot are done again from the ledger
(:func:`replay_ledger`: the backup's copy merged into the store's, and lines whose commit was not
confirmed settled against the database being replaced, first), so that no erased patient comes
back and no revoked key works again. Until that replay is done, a marker in the store
(``core.ledger.PENDING_FILE``) keeps the API and workers from starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, delete, inspect, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import deployment_key, heartbeat, ledger, migrate, retention
from core import repository as repo
from core.deployment_key import KEY_FILE
from core.errors import DomainError
from core.ledger import LEDGER_FILE
from core.ledger_replay import Replayed, replay, resolve
from core.store import FileStore, paths_overlap, sha256_file
from core.tables import Image, ScoringJob, WebSession, WorkerHeartbeat, as_utc, utcnow

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
    damaged: list[str] = field(default_factory=list)  # bytes no longer hash to the name (not used)
    key: str = "none"  # the deployment key: "copied", "kept", "replaced" or "none" (there was none)
    key_fingerprint: str = "none"  # which deployment's key (core.deployment_key.fingerprint)
    resent: int = 0  # restore: photographs and folder jobs waiting at the snapshot, sent again
    dump_sha256: str = ""  # of database.sqlite / database.pgdump: a damaged dump is refused
    database_id: str = ""  # which database (SQLite file, PostgreSQL host/port/name)
    #: restore: erasures and revocations after the snapshot done again from the ledger; None when
    #: the restored schema is older than this release's (`drscreen db replay-ledger` after the upgrade)
    replayed: Replayed | None = None
    #: backup: the store's ledger cannot be read (copied all the same; a restore would refuse it)
    ledger_problem: str = ""


def _no_progress(items: Iterable[str], _total: int, _what: str) -> Iterable[str]:
    return items


def _dump_name(kind: str) -> str:
    return SQLITE_FILE if kind == "sqlite" else PG_FILE


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


Snapshot = tuple[set[str], str | None, datetime]


def _snapshot_sqlite(url: str, target: Path) -> Snapshot:
    source = _sqlite_path(url)
    if not source.is_file():
        raise BackupError(f"no SQLite database at {source}")
    taken = utcnow()  # the copy below is one step: it holds what was committed by now
    try:
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)  # one consistent copy, while others write
            # the copy inherits the live database's WAL mode, which cannot be opened from a
            # read-only folder (a snapshot of the backup disk): a plain rollback journal instead
            dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the SQLite database at {source}: {exc}") from None
    return (*_named_files(f"sqlite:///{target}"), taken)


def _snapshot_postgresql(url: str, target: Path) -> Snapshot:
    pg_dump = _tool("pg_dump")
    libpq_url, env = _pg_command(url)
    engine = create_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            # pg_dump reads the very snapshot this transaction lists the files from
            # now(): the transaction's start, at or before its snapshot (a row committed in between
            # is in the backup too: "re-send what came after taken_at" re-sends no more than that)
            snapshot, began = conn.execute(text("SELECT pg_export_snapshot(), now()")).one()
            named = set(conn.execute(text(STORED_PATHS_SQL)).scalars()), _revision(conn), as_utc(began)
            dump = [pg_dump, "--format=custom", "--no-owner", f"--snapshot={snapshot}", f"--file={target}"]
            done = subprocess.run([*dump, libpq_url], capture_output=True, text=True, env=env, check=False)
            conn.rollback()
    finally:
        engine.dispose()
    if done.returncode != 0:
        raise BackupError(f"pg_dump failed: {_first_error(done.stderr)}")
    return named


def _makedirs(folder: Path, mode: int) -> None:
    """``folder`` and every missing parent with ``mode`` (``Path.mkdir`` gives it to the last only)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for level in reversed(missing):
        level.mkdir(mode=mode, exist_ok=True)


class _Damaged(Exception):
    """A stored file whose bytes no longer hash to its name."""


def _dump_ok(dump: Path, manifest: dict[str, object]) -> bool:
    """Whether the dump still hashes to what the backup recorded (older backups recorded none)."""
    recorded = manifest.get("dump_sha256")
    return not recorded or sha256_file(dump) == recorded


def _named_sha(path: Path) -> str:
    """The sha256 a stored file's name gives (``<sha256>.<ext>``)."""
    return path.name.partition(".")[0]


def _content_ok(path: Path) -> bool:
    """Whether a stored file still holds what its name says (its name is its bytes' sha256)."""
    return sha256_file(path) == _named_sha(path)


def _copy(source: Path, target: Path, dir_mode: int = 0o777, *, verify: bool = False) -> None:
    """Copy through a temporary file renamed into place: a reader never sees half a file. With
    ``verify``, the copy's bytes must hash to the name (:class:`_Damaged` otherwise, nothing kept)."""
    _makedirs(target.parent, dir_mode)
    with _temporary_in(target.parent, target.suffix) as tmp:
        shutil.copyfile(source, tmp)
        if verify and sha256_file(tmp) != _named_sha(source):
            raise _Damaged(source)
        os.replace(tmp, target)


def _sync_files(
    report: BackupReport,
    names: set[str],
    source: Path,
    target: Path,
    progress: Progress,
    dir_mode: int = 0o777,
    *,
    verify: bool = False,
) -> None:
    """Copy each named file from ``source`` to ``target`` unless already there (the same size: a
    name is its content's sha256, a partial copy is never renamed into place). With ``verify``
    (restores), a copy whose bytes do not hash to its name is not put in place: ``damaged``."""
    for relpath in progress(sorted(names), len(names), "files"):
        src, dst = source / relpath, target / relpath
        if dst.is_file() and (not src.is_file() or dst.stat().st_size == src.stat().st_size):
            report.kept += 1
        elif not src.is_file():
            report.missing.append(relpath)
        else:
            try:
                _copy(src, dst, dir_mode, verify=verify)
            except _Damaged:
                report.damaged.append(relpath)
                continue
            report.copied += 1


def _sync_key(source: Path, target: Path, dir_mode: int = 0o777) -> str:
    src, dst = source / KEY_FILE, target / KEY_FILE
    if not src.is_file():
        return "none"
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return "kept"
    replaced = dst.exists()
    if replaced:  # kept beside it (a dot file: no stored file, never pruned)
        shutil.copy2(dst, dst.with_name(f".{KEY_FILE}.replaced-{utcnow():%Y%m%dT%H%M%S%f}"))
    _copy(src, dst, dir_mode)  # a temporary file of mkstemp: readable by its owner only, as the key was
    return "replaced" if replaced else "copied"


def _stored_files_under(root: Path) -> set[str]:
    """The stored files under ``root`` (not the key or the ledger, not temporary files of a copy
    or an upload)."""
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (KEY_FILE, LEDGER_FILE) and not p.name.startswith(".")
    }


def _read_ledger(store_dir: Path) -> ledger.Ledger:
    try:
        return ledger.read_ledger(ledger.ledger_path(store_dir))
    except (OSError, ValueError) as exc:
        raise BackupError(
            f'the restore ledger cannot be read: {exc}; nothing was changed (README "Backup and restore")'
        ) from None


def _copy_ledger(source: Path, target: Path) -> str:
    """The store's ledger into the backup's copy, merged by line id: a copy never shrinks (a
    store whose ledger was lost must not take the lines of earlier erasures out of the backup).
    Returns a problem to warn about, or ""."""
    try:
        own = ledger.read_ledger(ledger.ledger_path(source))
    except (OSError, ValueError) as exc:
        return f"the store's restore ledger cannot be read ({exc}): the backup keeps its previous copy"
    copy_path = ledger.ledger_path(target)
    try:
        copy = ledger.read_ledger(copy_path)
    except (OSError, ValueError):  # a damaged copy: replaced by the store's whole ledger
        copy = ledger.Ledger()
    ids = {line.id for line in own.lines}
    kept = [line for line in copy.lines if line.id not in ids]
    if not own.lines and not kept:
        return ""
    _makedirs(target, 0o700)
    with _temporary_in(target, ".jsonl") as tmp:
        tmp.write_text(ledger.as_text(kept + own.lines), encoding="utf-8")
        os.replace(tmp, copy_path)
    if kept:
        return (
            f"the store's restore ledger lacks {len(kept)} line(s) this backup's copy has (kept in the "
            "copy; a restore merges them back)"
        )
    return ""


def _store_keys(store_dir: Path) -> dict[str, bytes]:
    """Every deployment key the store holds, by fingerprint: its own and the ones restores replaced
    (kept beside it as dot files by :func:`_sync_key`). Unreadable ones are left out."""
    keys = {}
    for path in [store_dir / KEY_FILE, *sorted(store_dir.glob(f".{KEY_FILE}.replaced-*"))]:
        with contextlib.suppress(OSError, deployment_key.DeploymentKeyError):
            key = deployment_key.read_key(path)
            keys[deployment_key.key_fingerprint(key)] = key
    return keys


def replay_ledger(url: str, store_root: Path) -> Replayed:
    """Do again the erasures and key revocations of the store's ledger that the database lacks
    (core.ledger_replay), commit, then remove the re-erased patients' files and the marker that
    keeps the API and workers from starting. Idempotent: a restore runs it when the schema is
    this release's, `drscreen db replay-ledger` after the upgrade an older backup needs. Refused
    on a machine without the store, and while a restore has not put the files back."""
    stage = pending_stage(store_root)
    if stage == RESTORING:
        raise BackupError(RESTORE_UNFINISHED)
    lines = _read_ledger(store_root) if store_root.is_dir() else ledger.Ledger()
    own = deployment_key.fingerprint(store_root)
    # erasures are matched with the store's keys; a deployment that never had one erased nobody,
    # and a restore of it leaves its marker: only that keyless store is replayed
    erasures = any(e.kind == ledger.ERASURE for e in lines.actions())
    if not store_root.is_dir() or (own in ("none", "unreadable") and (erasures or stage is None)):
        raise BackupError(
            f"the store folder {store_root} is missing or holds no deployment key: run this where the "
            "deployment's store is (DRSCREEN_STORE_DIR)"
        )
    keys = _store_keys(store_root)
    current = keys.get(own)
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            done = replay(session, lines, keys=keys, store_dir=store_root, key=current)
            session.commit()
            retention.remove_unreferenced_files(session, FileStore(store_root), done.files)
            session.commit()
    finally:
        engine.dispose()
    (store_root / ledger.PENDING_FILE).unlink(missing_ok=True)
    return done


#: What the marker (core.ledger.PENDING_FILE) says: the database was replaced and the files are
#: not all back yet (run the restore again), or only the ledger's replay is left.
RESTORING, REPLAYING = "restoring", "replaying"
RESTORE_UNFINISHED = (
    "a restore did not finish putting the backup's files and key back: run `drscreen db restore` "
    "again (the API and workers refuse to start until it has)"
)


def pending_stage(store_root: Path) -> str | None:
    """What a restore left to do, or None (core.ledger.PENDING_FILE)."""
    path = store_root / ledger.PENDING_FILE
    if not path.is_file():
        return None
    return RESTORING if path.read_text(encoding="utf-8").strip() == RESTORING else REPLAYING


def pending_problem(store_root: Path) -> str | None:
    """What an operator must run before the service starts, or None (:func:`pending_stage`)."""
    stage = pending_stage(store_root)
    if stage is None:
        return None
    if stage == RESTORING:
        return RESTORE_UNFINISHED
    return (
        "a restore has not finished: the erasures and key revocations made after its backup are not "
        "done again yet (erased patients may be back); run `drscreen db replay-ledger` (the API and "
        "workers refuse to start until it has)"
    )


def _set_stage(store_root: Path, stage: str) -> None:
    with _temporary_in(store_root, ".tmp") as tmp:
        tmp.write_text(stage + "\n", encoding="utf-8")
        os.replace(tmp, store_root / ledger.PENDING_FILE)


def _settled_before(url: str, kind: str) -> set[str] | None:
    """The ledger lines done in the database a restore is about to replace, or None when it
    cannot be read (lost, damaged, never migrated)."""
    if kind == "sqlite" and not _sqlite_path(url).is_file():
        return None
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            if "audit_event" not in inspect(session.connection()).get_table_names():
                return None
            return ledger.settled_ids(session)
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def _write_manifest(folder: Path, report: BackupReport) -> None:
    with _temporary_in(folder, ".json") as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)


def _database_id(url: str) -> str:
    """Which database a backup is of (told apart when no deployment key exists yet)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:{_sqlite_path(url).resolve()}"
    return f"postgresql:{parsed.host or ''}:{parsed.port or 5432}/{parsed.database or ''}"


def _check_backup_folder(folder: Path, kind: str, fingerprint: str, database_id: str, force: bool) -> bool:
    """Refuse a folder the prune would wreck; returns whether it must be created."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        raise BackupError(f"{folder} is not a folder")
    if not (folder / MANIFEST).is_file():
        if any(p for p in folder.iterdir() if not p.name.startswith(".tmp-")) and not force:
            raise BackupError(f"{folder} is not empty and holds no {MANIFEST}: choose an empty folder")
        return False
    previous = read_manifest(folder)
    mismatch = []
    if previous.get("database") != kind:
        mismatch.append(f"a {previous.get('database')} database, this one is {kind}")
    theirs = previous.get("key_fingerprint")
    if theirs not in (None, "none", fingerprint):  # a store without a key is another one too
        mismatch.append(f"deployment key {theirs}, this store's is {fingerprint}")
    elif fingerprint == "none" and previous.get("database_id") not in (None, "", database_id):
        # no key on either side yet: told apart by the database
        mismatch.append(f"database {previous.get('database_id')}, this one is {database_id}")
    if mismatch and not force:
        raise BackupError(
            f"{folder} holds another deployment's backup ({'; '.join(mismatch)}): this backup would "
            "delete it; choose another folder (or --force)"
        )
    return False


def take_backup(
    folder: Path, url: str, store_root: Path, progress: Progress = _no_progress, *, force: bool = False
) -> BackupReport:
    """Back up the database at ``url`` and the files of ``store_root`` it names into ``folder``."""
    kind = _kind(url)
    backup_store = folder / STORE_DIR
    if paths_overlap(folder, store_root) or paths_overlap(backup_store, store_root):
        # its store would be the live one: pruning it would delete photographs being uploaded
        raise BackupError(f"the backup folder {folder} overlaps the store {store_root}: choose another")
    fingerprint, database_id = deployment_key.fingerprint(store_root), _database_id(url)
    created = _check_backup_folder(folder, kind, fingerprint, database_id, force)
    if created:
        _makedirs(folder, 0o700)
    folder.chmod(0o700)  # it holds patients' photographs and the key
    for leftover in folder.glob(".tmp-*"):  # of a backup interrupted before
        leftover.unlink(missing_ok=True)
    dump_name = _dump_name(kind)
    try:
        with _temporary_in(folder, Path(dump_name).suffix) as tmp:
            names, revision, taken = (_snapshot_sqlite if kind == "sqlite" else _snapshot_postgresql)(
                url, tmp
            )
            report = BackupReport(str(folder), kind, revision, taken.isoformat(), files=len(names))
            report.key_fingerprint = fingerprint
            report.database_id = database_id
            report.dump_sha256 = sha256_file(tmp)
            _sync_files(report, names, store_root, backup_store, progress, dir_mode=0o700)
            report.key = _sync_key(store_root, backup_store, dir_mode=0o700)
            # after the snapshot: the copy holds at least the snapshot's lines
            report.ledger_problem = _copy_ledger(store_root, backup_store)
            os.replace(tmp, folder / dump_name)
    except BaseException:
        if created and not any(folder.rglob("*")):
            folder.rmdir()  # a failed first backup leaves no empty folder behind
        raise
    (folder / (PG_FILE if kind == "sqlite" else SQLITE_FILE)).unlink(missing_ok=True)  # the other kind's
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
    failure leaves the database as it was. pg_restore's SQL streams into psql (not held in memory)."""
    pg_restore, psql = _tool("pg_restore"), _tool("psql")
    libpq_url, env = _pg_command(url)
    load = [
        psql,
        "--no-psqlrc",
        "--quiet",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={libpq_url}",
    ]
    with tempfile.TemporaryFile() as dump_err, tempfile.TemporaryFile() as load_err:
        loader = subprocess.Popen(
            load, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=load_err, env=env
        )
        assert loader.stdin is not None
        dumper = subprocess.Popen(
            [pg_restore, "--no-owner", "--file=-", str(folder / PG_FILE)],
            stdout=subprocess.PIPE,
            stderr=dump_err,
            env=env,
        )
        assert dumper.stdout is not None
        try:
            loader.stdin.write(PG_EMPTY_SCHEMA.encode())
            shutil.copyfileobj(dumper.stdout, loader.stdin)
        except BrokenPipeError:
            pass  # psql stopped at an error: said below
        finally:
            # both ends closed before waiting: pg_restore blocked on a full pipe that a stopped
            # psql no longer reads would never end (the review: a dump over 64 KiB hung for ever)
            dumper.stdout.close()
            with contextlib.suppress(BrokenPipeError):
                loader.stdin.close()
            loaded, dumped = loader.wait(), dumper.wait()
        if loaded != 0:  # psql's error first: pg_restore then only reports the broken pipe
            load_err.seek(0)
            reason = _first_error(load_err.read().decode(errors="replace"))
            raise BackupError(f"restoring the dump failed: {reason}")
        if dumped != 0:
            dump_err.seek(0)
            raise BackupError(f"pg_restore failed: {_first_error(dump_err.read().decode(errors='replace'))}")


def _in_use(url: str, kind: str) -> str | None:
    """Why the target database looks in use (live workers, other sessions), or None."""
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            try:
                alive = heartbeat.live_workers(repo.worker_heartbeats(session), utcnow())
            except SQLAlchemyError:  # an empty database: no heartbeat table yet
                session.rollback()
                alive = []
            if alive:
                return f"{len(alive)} live worker(s) ({', '.join(w.node for w in alive[:3])})"
            if kind == "postgresql":
                others = session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        # not autovacuum; another role's sessions show a NULL backend_type
                        # without pg_read_all_stats (the API's role may not be the restorer's)
                        "AND coalesce(backend_type, 'client backend') = 'client backend'"
                    )
                )
                if others:
                    return f"{others} other session(s) on the database (the API?)"
    finally:
        engine.dispose()
    return None


#: What the sweep takes for long stale: rows waiting at the snapshot are sent again at its next run.
_LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _after_restore(url: str) -> int:
    """Drop the old machine's runtime state and mark what waited at the snapshot stale (its
    messages were on the old broker); returns how many photographs and folder jobs wait. A backup
    of an older schema may lack a table: `drscreen db upgrade` creates it empty."""
    engine = create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            present = set(inspect(session.connection()).get_table_names())
            for table in (WorkerHeartbeat, WebSession):
                if table.__tablename__ in present:
                    session.execute(delete(table))
            waiting = 0
            if "image" in present:
                images = update(Image).where(Image.status.in_(["queued", "running"]))
                waiting += int(
                    getattr(session.execute(images.values(updated_at=_LONG_AGO)), "rowcount", 0) or 0
                )
            if "scoring_job" in present:
                jobs = update(ScoringJob).where(ScoringJob.status.in_(["queued", "running"]))
                waiting += int(
                    getattr(session.execute(jobs.values(updated_at=_LONG_AGO)), "rowcount", 0) or 0
                )
            return waiting
    finally:
        engine.dispose()


def _check_store_writable(store_root: Path) -> None:
    try:
        store_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store_root, prefix=".tmp-"):
            pass
    except OSError as exc:
        raise BackupError(f"cannot write to the store {store_root}: {exc.strerror or exc}") from None


def restore_backup(
    folder: Path,
    url: str,
    store_root: Path,
    progress: Progress = _no_progress,
    *,
    remove_unnamed: bool = False,
    force: bool = False,
) -> BackupReport:
    """Put the backup in ``folder`` back: the database at ``url`` becomes the snapshot (whatever it
    held is replaced) and the snapshot's files are put in ``store_root`` where absent. Files of the
    store that no restored row names (photographs sent after the backup) are counted in
    ``pruned``, and deleted with ``remove_unnamed``. Run it with the API and workers stopped
    (refused otherwise, unless ``force``)."""
    manifest = read_manifest(folder)
    kind = _kind(url)
    if manifest.get("database") != kind:
        raise BackupError(f"the backup is of a {manifest.get('database')} database, the target is {kind}")
    if paths_overlap(folder, store_root):
        raise BackupError(f"the backup folder {folder} overlaps the store {store_root}: move it out first")
    dump = folder / _dump_name(kind)
    if not dump.is_file():
        raise BackupError(f"{dump} is missing: the backup is incomplete")
    if not _dump_ok(dump, manifest):  # before the database is replaced by something unreadable
        raise BackupError(f"{dump} is damaged (its sha256 is not the one recorded): nothing restored")
    _check_store_writable(store_root)  # before the database is touched: no half-restored machine
    # both ledgers read first, too: one that cannot be read would leave erasures undone
    _read_ledger(store_root)
    theirs = _read_ledger(folder / STORE_DIR)
    busy = None if force else _in_use(url, kind)
    if busy:
        raise BackupError(f"the target is in use: {busy}; stop the API and workers first (or --force)")
    try:
        merged = ledger.merge_into(store_root, theirs)
        resolve(store_root, merged, _settled_before(url, kind))
        _set_stage(store_root, RESTORING)  # until the files are back: no API, no worker
    except OSError as exc:
        raise BackupError(f"the store's restore ledger cannot be written ({exc}): nothing restored") from None
    (_restore_sqlite if kind == "sqlite" else _restore_postgresql)(folder, url)
    names, revision = _named_files(url)
    report = BackupReport(str(folder), kind, revision, str(manifest.get("taken_at", "")), files=len(names))
    try:
        report.resent = _after_restore(url)
        _sync_files(report, names, folder / STORE_DIR, store_root, progress, verify=True)
        # the restored audit rows were keyed with the backup's key (a different one: another store)
        report.key = _sync_key(folder / STORE_DIR, store_root)
        _set_stage(store_root, REPLAYING)
    except (OSError, SQLAlchemyError) as exc:
        raise BackupError(
            f"the database was restored, but not the rest ({exc}): {RESTORE_UNFINISHED}"
        ) from None
    if revision == migrate.head_revision():  # an older schema: after `drscreen db upgrade`
        try:
            report.replayed = replay_ledger(url, store_root)
        except (SQLAlchemyError, OSError, DomainError, BackupError) as exc:
            raise BackupError(
                f"the database was restored, but the erasures and key revocations made after the "
                f"backup were NOT done again ({exc}); fix that and run `drscreen db replay-ledger`: "
                "the API and workers refuse to start until it has run"
            ) from None
        names, _ = _named_files(url)
    unnamed = _stored_files_under(store_root) - names
    report.pruned = len(unnamed)
    if remove_unnamed:
        for relpath in unnamed:
            (store_root / relpath).unlink()
    return report


@dataclass
class VerifyReport:
    folder: str
    taken_at: str
    files: int  # stored files in the backup
    damaged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # whole-backup problems (dump, key, manifest)


def verify_backup(folder: Path, progress: Progress = _no_progress) -> VerifyReport:
    """Read every file of the backup in ``folder`` back: each stored file must hash to its name,
    the database dump to the sha256 recorded, the key must be there, and the manifest's count
    must hold. Nothing is changed. Run it now and then (bit rot on the backup disk), and before a
    restore."""
    manifest = read_manifest(folder)
    store = folder / STORE_DIR
    names = _stored_files_under(store)
    report = VerifyReport(str(folder), str(manifest.get("taken_at", "")), files=len(names))
    dump = folder / _dump_name(str(manifest.get("database")))
    if not dump.is_file() or dump.stat().st_size == 0:
        report.problems.append(f"{dump.name} is missing or empty")
    elif not _dump_ok(dump, manifest):
        report.problems.append(f"{dump.name} is damaged (its sha256 is not the one recorded)")
    if manifest.get("key") not in (None, "none") and not (store / KEY_FILE).is_file():
        report.problems.append(f"{KEY_FILE} is missing")
    try:
        ledger.read_ledger(ledger.ledger_path(store))
    except (OSError, ValueError) as exc:
        report.problems.append(f"{LEDGER_FILE}: {exc}")
    missing = manifest.get("missing")
    expected = int(str(manifest.get("files", 0))) - (len(missing) if isinstance(missing, list) else 0)
    if len(names) != expected:
        report.problems.append(f"{len(names)} stored files, the manifest names {expected}")
    for relpath in progress(sorted(names), len(names), "files"):
        if not _content_ok(store / relpath):
            report.damaged.append(relpath)
    return report
