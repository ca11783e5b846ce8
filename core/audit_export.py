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
from datetime import datetime
from typing import IO, Any

from sqlalchemy import select
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
    """The store holds no deployment key, so an erased patient cannot be recognised."""


#: Rows fetched from the database at a time (an audit trail grows without bound).
_BATCH = 1000


def _rows(
    session: Session,
    clinic_id: int,
    *,
    patient: Patient | None,
    erased_digest: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[tuple[AuditEvent, ApiKey | None, Patient | None]]:
    stmt = (
        select(AuditEvent, ApiKey, Patient)
        .outerjoin(ApiKey, ApiKey.id == AuditEvent.api_key_id)
        .outerjoin(Patient, Patient.id == AuditEvent.patient_id)
        .where(AuditEvent.clinic_id == clinic_id)
        .order_by(AuditEvent.at, AuditEvent.id)
        .execution_options(yield_per=_BATCH)
    )
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    if patient is not None:
        stmt = stmt.where(AuditEvent.patient_id == patient.id)
    elif erased_digest is not None:
        stmt = stmt.where(AuditEvent.action == retention.ERASE_ACTION)
    for event, key, who in session.execute(stmt):
        if erased_digest is not None and (event.detail or {}).get(retention.DIGEST_FIELD) != erased_digest:
            continue
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
) -> int:
    """Write the clinic's audit rows (of ``patient_id`` only, when given) to ``out``; returns how
    many. ``key``: the deployment key for finding an erased patient's erasure (default: the
    configured store's; :class:`NoDeploymentKey` when it has none, and none is created)."""
    patient = None
    erased_digest = None
    if patient_id is not None:
        patient = session.scalars(
            select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == patient_id.strip())
        ).one_or_none()
        if patient is None:  # erased, or never seen: only an erasure can name them now
            key = key if key is not None else deployment_key.existing_key(get_settings().store_path)
            if key is None:
                raise NoDeploymentKey(
                    f"no deployment key in {get_settings().store_path}: an erased patient is found by "
                    "their erasure's keyed digest; run this where DRSCREEN_STORE_DIR is the deployment's "
                    "store"
                )
            erased_digest = retention.patient_digest(patient_id, key)
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    written = 0
    for event, api_key, who in _rows(
        session, clinic_id, patient=patient, erased_digest=erased_digest, since=since, until=until
    ):
        cells: list[Any] = [
            as_utc(event.at).isoformat(timespec="seconds"),
            event.action,
            who.external_id if who is not None else (patient_id if erased_digest else None),
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
