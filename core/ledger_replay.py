"""Doing again, after a restore, the erasures and revocations the ledger (core.ledger) holds.

An erasure is done again when the restored database lacks its audit row (same id, action and
digest): the snapshot was taken before it (audit rows are never deleted, so one the snapshot lacks
came after it). Its patient is found by the keyed digest among the clinic's patients, with
whichever key made the digest (the store's before the restore, or the backup's), and erased as
``drscreen data erase --force`` would, audited with ``by="restore"`` (and a new ledger line). A
revocation is applied to a key the snapshot still holds active. Where the snapshot already has
them both are no-ops, so replaying a ledger twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import retention
from core.ledger import Entry
from core.tables import ApiKey, AuditEvent, Patient, utcnow


@dataclass
class Replayed:
    erasures: int = 0  # patients erased again
    revocations: int = 0  # keys revoked again
    unknown_key: int = 0  # erasures whose digest no known key made: not done again
    files: list[str] = field(default_factory=list)  # stored files only the re-erased rows named


def _in_snapshot(session: Session, entry: Entry) -> bool:
    detail = session.scalar(
        select(AuditEvent.detail).where(
            AuditEvent.id == entry.audit_id, AuditEvent.action == retention.ERASE_ACTION
        )
    )
    return isinstance(detail, dict) and detail.get(retention.DIGEST_FIELD) == entry.patient_hmac


def _patients_by_digest(session: Session, clinic_id: int, key: bytes) -> dict[str, str]:
    """The clinic's patients, keyed digest -> patient id."""
    ids = session.scalars(select(Patient.external_id).where(Patient.clinic_id == clinic_id))
    return {retention.patient_digest(external_id, key): external_id for external_id in ids}


def replay(
    session: Session,
    entries: Sequence[Entry],
    *,
    keys: Mapping[str, bytes],
    store_dir: Path,
    key: bytes | None,
) -> Replayed:
    """Do again what ``entries`` record and the restored database lacks. ``keys``: fingerprint ->
    deployment key, every key a digest may have been made with; ``key``: the store's key from now
    on (the new audit rows' digests). The caller commits, then removes ``files``."""
    done = Replayed()
    digests: dict[tuple[int, str], dict[str, str]] = {}
    for entry in entries:
        if entry.kind == "revocation":
            revoked = session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == entry.key_hash, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            done.revocations += int(getattr(revoked, "rowcount", 0) or 0)
            continue
        if entry.clinic_id is None or entry.patient_hmac is None or _in_snapshot(session, entry):
            continue
        made_with = keys.get(entry.key_id or "")
        if made_with is None:
            done.unknown_key += 1
            continue
        known = digests.setdefault(
            (entry.clinic_id, entry.key_id or ""), _patients_by_digest(session, entry.clinic_id, made_with)
        )
        external_id = known.pop(entry.patient_hmac, None)
        if external_id is None:  # not in the snapshot (came after it too, or erased twice)
            continue
        outcome = retention.erase_patient(
            session, entry.clinic_id, external_id, force=True, by="restore", key=key, store_dir=store_dir
        )
        done.erasures += int(outcome.found)
        done.files += outcome.files
    return done
