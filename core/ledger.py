"""What a restore must do again: erasures and key revocations made after the backup's snapshot.

A restore puts the database back as it was at the snapshot. Without this ledger a patient erased
since then would come back (the backup holds their photographs too), and an API key revoked since
then (a leaked one) would work again. So each erasure and each revocation also appends one line to
``ledger.jsonl`` in the store folder: beside the deployment key, outside the database, where a
restore does not roll it back.

The line is written just before the database commits (SQLAlchemy's ``before_commit``): a
transaction that rolls back (a preview, a refused erasure) writes nothing, and a line that cannot
be written fails the commit (:class:`core.errors.Unavailable`), so nothing is erased or revoked
without its line. A line whose commit then fails asks again for what was asked for.

Lines hold no patient id: an erasure keeps what its audit row keeps (the keyed digest, the key's
fingerprint) and the audit row's id; a revocation keeps the key's hash (``api_key.key_hash``).
``core.backup`` copies the ledger into each backup and, on restore, merges the backup's copy in
and hands every line to ``core.ledger_replay``.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from core.errors import Unavailable
from core.tables import utcnow

#: The ledger, at the root of the store folder (beside ``deployment.key``).
LEDGER_FILE = "ledger.jsonl"
_PENDING = "drscreen.ledger.pending"


@dataclass(frozen=True)
class Entry:
    """One line of the ledger."""

    id: str  # random: merging two copies of a ledger keeps each line once
    at: str  # ISO time it was recorded (for people reading the file; the replay does not use it)
    kind: Literal["erasure", "revocation"]
    clinic_id: int | None = None  # erasure: whose patient
    audit_id: int | None = None  # erasure: its audit row (in the snapshot = already erased there)
    patient_hmac: str | None = None  # erasure: the audit row's keyed digest of the patient id
    key_id: str | None = None  # erasure: the fingerprint of the key that made the digest
    key_hash: str | None = None  # revocation: api_key.key_hash


def ledger_path(store_dir: Path) -> Path:
    return store_dir / LEDGER_FILE


def record_erasure(
    session: Session, store_dir: Path, *, clinic_id: int, audit_id: int, patient_hmac: str, key_id: str
) -> None:
    """Have the session's commit append this erasure to ``store_dir``'s ledger."""
    _pending(session).append(
        (
            store_dir,
            _new("erasure", clinic_id=clinic_id, audit_id=audit_id, patient_hmac=patient_hmac, key_id=key_id),
        )
    )


def record_revocation(session: Session, store_dir: Path, key_hash: str) -> None:
    """Have the session's commit append this key's revocation to ``store_dir``'s ledger."""
    _pending(session).append((store_dir, _new("revocation", key_hash=key_hash)))


def read_ledger(path: Path) -> list[Entry]:
    """Every line of a ledger file (none when it does not exist). Raises ValueError naming the
    first line that is not a ledger entry: a replay must not skip an erasure silently."""
    if not path.is_file():
        return []
    entries = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
                entries.append(Entry(**fields))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}, line {number}: not a ledger entry ({exc})") from None
    return entries


def merge_into(store_dir: Path, entries: Iterable[Entry]) -> list[Entry]:
    """Append to ``store_dir``'s ledger the entries it lacks (by id); returns the merged ledger."""
    with _locked(ledger_path(store_dir)) as fd:
        own = read_ledger(ledger_path(store_dir))
        known = {entry.id for entry in own}
        new = [entry for entry in entries if entry.id not in known]
        _write(fd, new)
    return own + new


def _new(kind: Literal["erasure", "revocation"], **fields: Any) -> Entry:
    return Entry(id=uuid.uuid4().hex, at=utcnow().isoformat(), kind=kind, **fields)


def _pending(session: Session) -> list[tuple[Path, Entry]]:
    pending: list[tuple[Path, Entry]] = session.info.setdefault(_PENDING, [])
    return pending


class _locked:
    """The ledger file opened for appending, under an exclusive lock (the API and workers of
    several machines may append to one shared store)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)  # releases the lock


def _write(fd: int, entries: list[Entry]) -> None:
    if not entries:
        return
    data = "".join(json.dumps(asdict(entry), sort_keys=True) + "\n" for entry in entries).encode()
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


@event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
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
            raise Unavailable(
                f"the restore ledger {ledger_path(store_dir)} cannot be written "
                f"({exc.strerror or exc}): nothing was changed"
            ) from exc


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # rolled back or closed (a commit took them already)
        session.info.pop(_PENDING, None)
