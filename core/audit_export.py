"""The audit trail as CSV, for a clinic's data-protection officer: who uploaded, read, erased what
and when (``drscreen data audit``).

Every row of ``audit_event`` of the clinic in the period, oldest first, with the API key that
acted (id, prefix, label: never the key) and the patient's id while the patient exists. An erased
patient's rows lost that link (the erasure keeps no patient id); asked for by ``--patient``, the
erasure itself is still found, by the keyed digest its row holds (``core.retention``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import false, select
from sqlalchemy.orm import Session

from core import deployment_key, retention
from core.csvcells import csv_cell
from core.settings import get_settings
from core.tables import ApiKey, AuditEvent, Patient, as_utc

COLUMNS = [
    "at_utc",
    "action",
    "patient_id",
    "target_type",
    "target_id",
    "key_id",
    "key_prefix",
    "key_label",
    "detail",
]


class NoDeploymentKey(Exception):
    """An erasure cannot be matched: the store holds no deployment key, or another one than the
    erasure rows were keyed with (another disk at the store's path, or a lost key)."""


#: Rows fetched from the database at a time (an audit trail grows without bound).
_BATCH = 1000


@dataclass(frozen=True)
class _Erased:
    """How to recognise the erasure rows of one patient id (core.retention's keyed digests)."""

    patient_id: str
    key: bytes

    def matches(self, event: AuditEvent) -> bool:
        detail = event.detail if isinstance(event.detail, dict) else {}
        keyed_with = detail.get(retention.KEY_ID_FIELD)
        if keyed_with is not None and keyed_with != deployment_key.key_fingerprint(self.key):
            raise NoDeploymentKey(
                f"the erasure rows were keyed with deployment key {keyed_with}, this store's is "
                f"{deployment_key.key_fingerprint(self.key)}: run this where DRSCREEN_STORE_DIR is "
                "the deployment's store"
            )
        digest = retention.patient_digest(self.patient_id, self.key)
        if detail.get(retention.DIGEST_FIELD) == digest:
            return True
        legacy = detail.get(retention.LEGACY_DIGEST_FIELD)  # not sealed by a worker yet
        return bool(legacy) and deployment_key.seal(self.key, str(legacy)) == digest


def _rows(
    session: Session,
    clinic_id: int,
    *,
    patient: Patient | None,
    erased: _Erased | None,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[tuple[AuditEvent, ApiKey | None, Patient | None]]:
    # a purge of every clinic is recorded once, with no clinic: it belongs to each clinic's trail
    everyone = (AuditEvent.clinic_id.is_(None)) & (AuditEvent.action == retention.PURGE_ACTION)
    stmt = (
        select(AuditEvent, ApiKey, Patient)
        .outerjoin(ApiKey, ApiKey.id == AuditEvent.api_key_id)
        .outerjoin(Patient, Patient.id == AuditEvent.patient_id)
        .where((AuditEvent.clinic_id == clinic_id) | everyone)
        .order_by(AuditEvent.at, AuditEvent.id)
        .execution_options(yield_per=_BATCH)
    )
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    filtered = patient is not None or erased is not None
    if filtered:
        # the patient's own rows, and the erasures of an earlier patient of that id
        own = AuditEvent.patient_id == patient.id if patient is not None else false()
        stmt = stmt.where(own | (AuditEvent.action == retention.ERASE_ACTION))
    for event, key, who in session.execute(stmt):
        if (
            filtered
            and event.action == retention.ERASE_ACTION
            and (erased is None or not erased.matches(event))
        ):
            continue  # another patient's erasure
        yield event, key, who


def write_audit_csv(
    session: Session,
    out: IO[str],
    clinic_id: int,
    *,
    patient_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    key: bytes | None = None,
    notes: list[str] | None = None,
) -> int:
    """Write the clinic's audit rows (of ``patient_id`` only, when given: their rows and any
    erasure of that id) to ``out``; returns how many. ``key``: the deployment key that recognises
    an erasure (default: the configured store's, never created here). :class:`NoDeploymentKey`
    when an erased patient is asked for and no key, or another one, can say; ``notes`` gets what
    the rows cannot show (an existing patient's earlier erasures, without a key)."""
    patient = None
    erased = None
    if patient_id is not None:
        patient_id = patient_id.strip()
        patient = session.scalars(
            select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == patient_id)
        ).one_or_none()
        key = key if key is not None else deployment_key.existing_key(get_settings().store_path)
        if key is not None:
            erased = _Erased(patient_id, key)
        elif patient is not None and notes is not None:
            notes.append(
                "no deployment key here: an earlier erasure of this patient id (if any) cannot be "
                "matched and is not listed"
            )
        else:  # erased, or never seen: only an erasure can name them now
            raise NoDeploymentKey(
                f"no deployment key in {get_settings().store_path}: an erased patient is found by "
                "their erasure's keyed digest; run this where DRSCREEN_STORE_DIR is the deployment's "
                "store"
            )
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    written = 0
    for event, api_key, who in _rows(
        session, clinic_id, patient=patient, erased=erased, since=since, until=until
    ):
        named = who.external_id if who is not None else None
        if named is None and event.action == retention.ERASE_ACTION and patient_id is not None:
            named = patient_id
        cells: list[Any] = [
            as_utc(event.at).isoformat(timespec="seconds"),
            event.action,
            named,
            event.target_type,
            event.target_id,
            event.api_key_id,
            api_key.prefix if api_key is not None else None,
            api_key.label if api_key is not None else None,
            json.dumps(event.detail, sort_keys=True) if event.detail else None,
        ]
        writer.writerow([csv_cell(c) for c in cells])
        written += 1
    return written
