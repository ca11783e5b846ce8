"""Doing again, after a restore, the erasures and revocations the ledger (core.ledger) holds.

An erasure line is done in a database exactly when the database holds its id: in the audit row
of the erasure (``detail.ledger_entry``) or in the audit row of a replay that went through it
(``ledger.replay``, ``detail.entries``). A line the restored snapshot lacks is done again: its
patient is found by the keyed digest among the clinic's patients (the clinic named as when the line
was written), with whichever key made the digest (the store's, or one a restore replaced), and
erased as ``drscreen data erase --force`` would, the audit row holding the line's id. Lines whose
patient or clinic the snapshot lacks are recorded as gone through all the same, so that a backup
taken later, when the clinic may have sent that patient again, never erases them. A revocation
line revokes its key if the snapshot holds it active (dated as the line). Replaying twice changes
nothing.

A line whose commit failed is voided when it fails (core.ledger asks the database again). Lines
left unconfirmed by a crash are settled at a restore: committed if the database it replaces, or
the restored one, holds them; else undecided: not done (an erasure whose commit failed must not
happen later, perhaps to a patient sent again), and reported at every restore and replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import ledger, retention
from core import repository as repo
from core.ledger import ERASURE, REVOCATION, Entry, Ledger
from core.tables import ApiKey, Clinic, Patient, as_utc, utcnow


@dataclass
class Replayed:
    erasures: int = 0  # patients erased again
    revocations: int = 0  # keys revoked again
    unknown_key: int = 0  # erasures whose digest no known key made: not done again
    unconfirmed: int = 0  # erasures whose commit could not be settled: not done again
    files: list[str] = field(default_factory=list)  # stored files only the re-erased rows named


def resolve(store_dir: Path, lines: Ledger, settled_before: set[str] | None) -> None:
    """Settle the unconfirmed lines against the database a restore is about to replace
    (``settled_before``: the lines done in it; None: it cannot be read): an erasure it holds was
    committed. Revocations are confirmed (revoking a key someone asked to revoke is harmless).
    Nothing is voided here: a database that lacks a line may not be the one it was made on (a
    database made anew, or restored over); a failed commit was voided when it failed."""
    unconfirmed = lines.unconfirmed()
    committed = [e.id for e in unconfirmed if e.kind == REVOCATION]
    if settled_before is not None:
        committed += [e.id for e in unconfirmed if e.kind == ERASURE and e.id in settled_before]
    ledger.mark(store_dir, ledger.COMMITTED, committed)


def _patients_by_digest(session: Session, clinic_id: int, key: bytes) -> dict[str, str]:
    """The clinic's patients, keyed digest -> patient id."""
    ids = session.scalars(select(Patient.external_id).where(Patient.clinic_id == clinic_id))
    return {retention.patient_digest(external_id, key): external_id for external_id in ids}


def _recorded_at(entry: Entry) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(entry.at))
    except ValueError:
        return utcnow()


def _revoke(session: Session, entry: Entry) -> int:
    revoked = session.execute(
        update(ApiKey)
        .where(ApiKey.key_hash == entry.key_hash, ApiKey.revoked_at.is_(None))
        .values(revoked_at=_recorded_at(entry))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(revoked, "rowcount", 0) or 0)


def replay(
    session: Session,
    lines: Ledger,
    *,
    keys: Mapping[str, bytes],
    store_dir: Path,
    key: bytes | None,
) -> Replayed:
    """Do again what ``lines`` record and the database lacks (module docstring). ``keys``:
    fingerprint -> deployment key, every key a digest may have been made with; ``key``: the
    store's key from now on (the new audit rows' digests). The caller commits, then removes
    ``files``."""
    settled = ledger.settled_ids(session)
    undecided = [e.id for e in lines.unconfirmed() if e.kind == ERASURE]
    ledger.mark(store_dir, ledger.COMMITTED, [i for i in undecided if i in settled])  # it holds them
    done = Replayed(unconfirmed=sum(1 for i in undecided if i not in settled))
    gone_through: list[str] = []
    digests: dict[tuple[int, str], dict[str, str]] = {}
    confirmed = lines.confirmed()
    for entry in confirmed:
        if entry.kind == REVOCATION:
            done.revocations += _revoke(session, entry)
            continue
        if entry.id in settled:
            continue
        made_with = keys.get(entry.key_id or "")
        if made_with is None:  # left for a replay that has the key
            done.unknown_key += 1
            continue
        gone_through.append(entry.id)
        clinic = session.get(Clinic, entry.clinic_id) if entry.clinic_id is not None else None
        if clinic is None or (entry.clinic and clinic.name != entry.clinic):
            continue  # the clinic came after the snapshot (its id may be another clinic's now)
        cache = (clinic.id, entry.key_id or "")
        if cache not in digests:
            digests[cache] = _patients_by_digest(session, clinic.id, made_with)
        external_id = digests[cache].pop(entry.patient_hmac or "", None)
        if external_id is None:  # the patient came after the snapshot too
            continue
        outcome = retention.erase_patient(
            session,
            clinic.id,
            external_id,
            force=True,
            by="restore",
            key=key,
            store_dir=store_dir,
            ledger_entry=entry.id,
        )
        done.erasures += int(outcome.found)
        done.files += outcome.files
    if gone_through:
        detail = {"by": "restore", "entries": gone_through, "erased": done.erasures}
        repo.record_audit(session, action=ledger.REPLAY_ACTION, target_type="retention", detail=detail)
    return done
