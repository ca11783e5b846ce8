"""``Idempotency-Key`` support for the POSTs that create work.

A retried POST with the same key (same clinic, within a day) answers the resource created the
first time instead of creating another; the same key with a different request is a conflict.

The keys are kept as rows of the audit table (action ``idempotency_key``, the key's sha256 as
``target_id``) rather than in a table of their own: the audit table already records who wrote
what, and it spares a migration. Two *concurrent* first attempts can still both go through; clients
retry after a failure or a timeout, not in parallel, which is the case this covers.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import Conflict, InvalidInput
from core.tables import AuditEvent, utcnow

ACTION = "idempotency_key"
VALID_FOR = timedelta(hours=24)
MAX_KEY_LENGTH = 200


def _key_hash(kind: str, key: str) -> str:
    return hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} printable characters")
    return key


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def find(session: Session, clinic_id: int, kind: str, key: str, request_fingerprint: str) -> str | None:
    """The id created earlier with this key, or None. Conflict when the key was used for another
    request."""
    row = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.clinic_id == clinic_id,
            AuditEvent.action == ACTION,
            AuditEvent.target_id == _key_hash(kind, key),
            AuditEvent.at >= utcnow() - VALID_FOR,
        )
        .order_by(AuditEvent.id.desc())
        .limit(1)
    ).first()
    if row is None or not row.detail:
        return None
    if row.detail.get("fingerprint") != request_fingerprint:
        raise Conflict("this Idempotency-Key was already used for a different request")
    resource = row.detail.get("id")
    return str(resource) if resource else None


def remember(
    session: Session,
    *,
    clinic_id: int,
    api_key_id: int,
    kind: str,
    key: str,
    request_fingerprint: str,
    resource_id: str,
) -> None:
    repo.record_audit(
        session,
        action=ACTION,
        clinic_id=clinic_id,
        api_key_id=api_key_id,
        target_type=kind,
        target_id=_key_hash(kind, key),
        detail={"id": resource_id, "fingerprint": request_fingerprint},
    )
