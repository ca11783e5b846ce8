"""The audit trail: who did what to which record, per clinic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import AuditEvent, utcnow


def record_audit(
    session: Session,
    *,
    action: str,
    clinic_id: int | None = None,
    api_key_id: int | None = None,
    patient_id: int | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    row = AuditEvent(
        action=action,
        clinic_id=clinic_id,
        api_key_id=api_key_id,
        patient_id=patient_id,
        target_type=target_type,
        target_id=target_id,
        detail=detail,
        at=at or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def list_audit_events(session: Session, clinic_id: int, limit: int = 100) -> list[AuditEvent]:
    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.clinic_id == clinic_id)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
            .limit(limit)
        )
    )
