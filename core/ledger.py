"""What a restore must do again: erasures and key revocations made after the backup's snapshot.

A restore puts the database back as it was at the snapshot. Without this ledger a patient erased
since then would come back (the backup holds their photographs too), and an API key revoked since
then (a leaked one) would work again. So each erasure and each revocation also appends one line to
``ledger.jsonl`` in the store folder: beside the deployment key, outside the database, where a
restore does not roll it back.

Two phases, so that a line never stands for something that did not happen: the line is written
and synced just before the database commits (SQLAlchemy's ``before_commit``; a line that cannot be
written fails the commit with :class:`core.errors.Unavailable`, so nothing is erased without its
line), and a ``committed`` line naming it is appended after the commit. When the commit fails,
the database is asked again on a new connection (a COMMIT can fail on the way back after the
server did it): ``committed`` if it holds the line, else ``void``. A line a crash left without
either is done at a restore only where a database holds it (``core.ledger_replay``), and
reported until then.

Each erasure line has a random id, which its audit row also holds (``detail.ledger_entry``), and a
restore's replay records the ids it went through: a line is done in a database exactly when the
database holds its id. Database ids (audit rows, clinics) are not used to match: a restore rolls
them back, and they are given again. Lines hold no patient id: the erasure's keyed digest (as its
audit row) and the clinic, or the revoked key's hash (``api_key.key_hash``). A store's ledger
applies to whatever database is restored into it (a staging copy replays its own erasures).

A write that is cut short (a crash mid-line) leaves an unterminated last line: it was never
committed (the commit follows the sync), readers ignore it and the next append removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction

from core import deployment_key, heartbeat
from core.errors import Unavailable
from core.tables import AuditEvent, Image, WorkerHeartbeat, utcnow

log = logging.getLogger(__name__)

#: The ledger, at the root of the store folder (beside ``deployment.key``).
LEDGER_FILE = "ledger.jsonl"
#: Present from just before a restore replaces the database until its replay is done: the API and
#: workers refuse to start while it is there (an erased patient would be served again).
PENDING_FILE = ".ledger-replay-pending"
ERASURE, REVOCATION, COMMITTED, VOID = "erasure", "revocation", "committed", "void"
#: The audit action of an erasure, its detail's fields naming the erasure's line and the key of its
#: digest (core.retention), and the audit action of a replay, whose detail lists the erasure lines
#: it went through (core.ledger_replay).
ERASE_ACTION, LEDGER_FIELD, KEY_ID_FIELD = "patient.erase", "ledger_entry", "key_id"
REPLAY_ACTION = "ledger.replay"
KINDS = (ERASURE, REVOCATION, COMMITTED, VOID)
_PENDING = "drscreen.ledger.pending"  # session.info: lines to write at the commit
_WRITTEN = "drscreen.ledger.written"  # session.info: lines written, to confirm after the commit


@dataclass(frozen=True)
class Entry:
    """One line of the ledger."""

    id: str  # random: the same line in two copies of a ledger is one line
    at: str  # ISO time it was recorded (a replayed revocation is dated with it)
    kind: str  # one of KINDS
    clinic_id: int | None = None  # erasure: whose patient
    clinic: str | None = None  # erasure: the clinic's name (an id can be given again after a restore)
    patient_hmac: str | None = None  # erasure: the audit row's keyed digest of the patient id
    key_id: str | None = None  # erasure: the fingerprint of the key that made the digest
    key_hash: str | None = None  # revocation: api_key.key_hash
    of: list[str] = field(default_factory=list)  # committed / void: the lines they settle


@dataclass
class Ledger:
    """A ledger file read back."""

    lines: list[Entry] = field(default_factory=list)

    def _marked(self, kind: str) -> set[str]:
        return {line_id for line in self.lines if line.kind == kind for line_id in line.of}

    def actions(self) -> list[Entry]:
        """Erasures and revocations, in the order recorded."""
        return [line for line in self.lines if line.kind in (ERASURE, REVOCATION)]

    def unconfirmed(self) -> list[Entry]:
        """Actions whose commit was not confirmed, nor found void."""
        settled = self._marked(COMMITTED) | self._marked(VOID)
        return [line for line in self.actions() if line.id not in settled]

    def confirmed(self) -> list[Entry]:
        """Actions known to have been committed. A ``committed`` mark wins over a ``void`` one: it is
        written only once a database held the line (after its commit, or found there)."""
        committed = self._marked(COMMITTED)
        return [line for line in self.actions() if line.id in committed]


def ledger_path(store_dir: Path) -> Path:
    return store_dir / LEDGER_FILE


def erasure_entry(*, clinic_id: int, clinic: str, patient_hmac: str, key_id: str) -> Entry:
    return _new(ERASURE, clinic_id=clinic_id, clinic=clinic, patient_hmac=patient_hmac, key_id=key_id)


def revocation_entry(key_hash: str) -> Entry:
    return _new(REVOCATION, key_hash=key_hash)


class StoreRefused(Unavailable):
    """An erasure refused because its line would land in a ledger no restore reads.
    ``message`` is what a clinic is told; ``operator_detail`` names the paths and keys."""

    def __init__(self, detail: str) -> None:
        super().__init__("erasures cannot be recorded now: the operator must check the store")
        self.operator_detail = detail
        log.error("erasure refused: %s", detail)


def store_problem(session: Session, store_dir: Path, *, may_make_key: bool = True) -> str | None:
    """Why a line written to ``store_dir``'s ledger would be in a ledger no restore reads, or None:
    the folder is missing on this machine; its deployment key is damaged, or lost (earlier erasures
    were recorded with one: a new key would leave their lines matchable by none); it has no key and
    none of the photographs the database names (a folder of the same path that is not the
    deployment's store: every container of the image has an empty one), or, for a revocation
    (``may_make_key=False``), no key at all; or its key is not the live workers'. Nothing is
    created here."""
    if not store_dir.is_dir():
        return f"the store folder {store_dir} does not exist on this machine"
    own = deployment_key.fingerprint(store_dir)
    if own == "unreadable":
        return (
            f"the deployment key in {store_dir} cannot be read: copy store/{deployment_key.KEY_FILE} back "
            "from a backup"
        )
    if own == "none" and _key_existed(session):
        return (
            f"the deployment key is missing from {store_dir} (earlier erasures were recorded with one): "
            f"copy store/{deployment_key.KEY_FILE} back from a backup, keeping any key there now beside "
            f"it as .{deployment_key.KEY_FILE}.replaced-<date>"
        )
    if own == "none" and not (may_make_key and _holds_named_files(session, store_dir)):
        return (
            f"the store folder {store_dir} holds no deployment key"
            + ("" if not may_make_key else " and none of the photographs the database names")
            + ": it is not the deployment's store, or no worker has started on it yet"
        )
    rows = session.scalars(select(WorkerHeartbeat))
    theirs = {
        str((beat.settings or {}).get(heartbeat.STORE_IDENTITY))
        for beat in heartbeat.live_workers(rows, utcnow())
        if (beat.settings or {}).get(heartbeat.STORE_IDENTITY) not in (None, "none")
    }
    if theirs and own not in theirs:
        keys = ", ".join(sorted(theirs))
        return f"the store folder {store_dir} is not the live workers' (its key {own}, theirs {keys})"
    return None


def _key_existed(session: Session) -> bool:
    """Whether an erasure was recorded with a deployment key (its audit row names the key). The
    newest erasures are read: once a key exists every erasure names it, and erasures from before
    keys (any 50 of them, unordered) hid a keyed one behind them."""
    details = session.scalars(
        select(AuditEvent.detail)
        .where(AuditEvent.action == ERASE_ACTION)
        .order_by(AuditEvent.id.desc())
        .limit(50)
    )
    return any(isinstance(d, dict) and d.get(KEY_ID_FIELD) for d in details)


def _holds_named_files(session: Session, store_dir: Path, sample: int = 5) -> bool:
    """Whether ``store_dir`` holds photographs the database names (a few looked at; a database
    that names none: a deployment that has stored nothing yet)."""
    paths = list(session.scalars(select(Image.stored_path).order_by(Image.created_at).limit(sample)))
    return not paths or any((store_dir / path).is_file() for path in paths)


def check_store(session: Session, store_dir: Path) -> None:
    """Refuse (:class:`StoreRefused`) an erasure whose line would be in a ledger no restore reads
    (:func:`store_problem`); make the store's deployment key on first use."""
    problem = store_problem(session, store_dir)
    if problem is not None:
        raise StoreRefused(
            f"{problem}: erasures are recorded in the deployment's store's restore ledger; run this "
            "where the deployment's store is (DRSCREEN_STORE_DIR)"
        )
    deployment_key.deployment_key(store_dir)


def settled_ids(session: Session) -> set[str]:
    """The erasure lines a database holds as done: named by an erasure's audit row, or listed by
    a replay's."""
    done: set[str] = set()
    rows = session.execute(
        select(AuditEvent.action, AuditEvent.detail).where(
            AuditEvent.action.in_((ERASE_ACTION, REPLAY_ACTION))
        )
    )
    for action, detail in rows:
        if not isinstance(detail, dict):
            continue
        if action == REPLAY_ACTION:
            done.update(str(line_id) for line_id in detail.get("entries") or [])
        elif detail.get(LEDGER_FIELD):
            done.add(str(detail[LEDGER_FIELD]))
    return done


def record(session: Session, store_dir: Path, entry: Entry) -> None:
    """Have the session's commit write ``entry`` to ``store_dir``'s ledger (module docstring)."""
    session.info.setdefault(_PENDING, []).append((store_dir, entry))


def read_ledger(path: Path) -> Ledger:
    """A ledger file (empty when it does not exist). Raises ValueError naming the first complete
    line that is not a ledger line: a replay must not skip an erasure silently. Fields a newer
    release added are ignored; a kind this release does not know is refused."""
    if not path.is_file():
        return Ledger()
    known = {f.name for f in dataclasses.fields(Entry)}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # an unterminated last line: a write cut short
    lines = []
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            entry = Entry(**{k: v for k, v in fields.items() if k in known})
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}, line {number}: not a ledger line ({exc})") from None
        if entry.kind not in KINDS:
            raise ValueError(f"{path}, line {number}: a kind this release does not know ({entry.kind!r})")
        lines.append(entry)
    return Ledger(lines)


def merge_into(store_dir: Path, other: Ledger) -> Ledger:
    """Append to ``store_dir``'s ledger the lines of ``other`` it lacks (by id); returns the
    merged ledger."""
    with _locked(ledger_path(store_dir)) as fd:
        own = read_ledger(ledger_path(store_dir))
        known = {line.id for line in own.lines}
        new = [line for line in other.lines if line.id not in known]
        _write(fd, new)
    return Ledger(own.lines + new)


def mark(store_dir: Path, kind: str, ids: Iterable[str]) -> None:
    """Append a ``committed`` or ``void`` line settling ``ids``."""
    settled = sorted(set(ids))
    if settled:
        with _locked(ledger_path(store_dir)) as fd:
            _write(fd, [_new(kind, of=settled)])


def as_text(entries: Iterable[Entry]) -> str:
    """Ledger lines as the file holds them (one JSON object a line)."""
    return "".join(json.dumps(asdict(entry), sort_keys=True) + "\n" for entry in entries)


def _new(kind: str, **fields: Any) -> Entry:
    return Entry(id=uuid.uuid4().hex, at=utcnow().isoformat(), kind=kind, **fields)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The ledger file opened for appending, under an exclusive lock (the API and workers of
    several machines may append to one shared store). The store folder must exist: a machine
    without it (an operator's laptop) would record in a ledger no restore reads."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the store folder {path.parent} does not exist")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _write(fd: int, entries: list[Entry]) -> None:
    """Append whole lines, synced; on any error the file is cut back to where it was."""
    if not entries:
        return
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short before: never committed
        tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
        size -= len(tail) - (tail.rfind(b"\n") + 1)
        os.ftruncate(fd, size)
    data = as_text(entries).encode()
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


@event.listens_for(Session, "before_commit")
def _write_pending(session: Session) -> None:
    pending: list[tuple[Path, Entry]] = session.info.get(_PENDING) or []
    if not pending:
        return
    by_store: dict[Path, list[Entry]] = {}
    for store_dir, entry in pending:
        by_store.setdefault(store_dir, []).append(entry)
    for store_dir, entries in by_store.items():
        try:
            with _locked(ledger_path(store_dir)) as fd:
                _write(fd, entries)
        except OSError as exc:  # nothing committed: the erasure or revocation did not happen
            log.error("the restore ledger %s cannot be written: %s", ledger_path(store_dir), exc)
            raise Unavailable(
                "the restore ledger in the store folder cannot be written "
                f"({exc.strerror or exc}): nothing was changed"
            ) from exc
        session.info.setdefault(_WRITTEN, []).append((store_dir, entries))
    session.info.pop(_PENDING, None)  # only now: a commit retried after a failure writes them again


@event.listens_for(Session, "after_commit")
def _confirm_written(session: Session) -> None:
    for store_dir, entries in session.info.pop(_WRITTEN, None) or []:
        try:
            mark(store_dir, COMMITTED, [e.id for e in entries])
        except OSError as exc:  # committed all the same: the next restore settles the lines
            log.warning("the restore ledger %s: commit not confirmed: %s", ledger_path(store_dir), exc)


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return
    session.info.pop(_PENDING, None)
    written = session.info.pop(_WRITTEN, None)  # written, and the commit not confirmed
    if written:
        _settle_failed_commit(session, written)


def _settle_failed_commit(session: Session, written: list[tuple[Path, list[Entry]]]) -> None:
    """Lines written for a transaction whose commit failed: asked again of the database on a new
    connection (a COMMIT can fail on the way back after the server did it), ``committed`` if it
    holds them, ``void`` if not. Revocations are confirmed either way (harmless again). Nothing is
    marked when the database cannot answer: the next restore asks the database it replaces."""
    try:
        with session.get_bind().engine.connect() as conn, Session(bind=conn) as fresh:
            held = settled_ids(fresh)
    except Exception as exc:  # the database that just failed the commit may still be down
        log.warning("the restore ledger: a failed commit's lines left for the next restore: %s", exc)
        return
    for store_dir, entries in written:
        committed = [e.id for e in entries if e.id in held or e.kind == REVOCATION]
        try:
            mark(store_dir, COMMITTED, committed)
            mark(store_dir, VOID, [e.id for e in entries if e.id not in committed])
        except OSError as exc:
            log.warning("the restore ledger %s: a failed commit not settled: %s", ledger_path(store_dir), exc)
