"""``Idempotency-Key`` support for the POSTs that create work.

A retried POST with the same key (same clinic, within a day) answers the resource created the
first time instead of creating another; the same key with a different request is a conflict.

The keys live in the ``idempotency_key`` table (the sha256 of ``kind:key``, the request's
fingerprint, the id created), UNIQUE on (clinic, key hash). :func:`find` answers a retry of a
request that has committed; :func:`remember` inserts the key in the transaction that writes the
work, so two *concurrent* first attempts cannot both commit: the second INSERT fails on the unique
constraint (on PostgreSQL it first waits for the other transaction to end). The route then rolls
its own work back, queues nothing, and answers as a retry would (:func:`find` again: the winner's
resource, or a conflict when the winner was another request); see
``services.routes.images.commit_and_enqueue``. A key expires after :data:`VALID_FOR`; its row is
then replaced by the next request that uses the key.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.errors import Conflict, InvalidInput
from core.tables import IdempotencyKey, utcnow

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
    """The id created earlier (and committed) with this key, or None. Conflict when the key was
    used for another request."""
    row = session.scalars(
        select(IdempotencyKey).where(
            IdempotencyKey.clinic_id == clinic_id,
            IdempotencyKey.key_hash == _key_hash(kind, key),
            IdempotencyKey.created_at >= utcnow() - VALID_FOR,
        )
    ).first()
    if row is None:
        return None
    if row.fingerprint != request_fingerprint:
        raise Conflict("this Idempotency-Key was already used for a different request")
    return row.resource_id


def remember(
    session: Session,
    *,
    clinic_id: int,
    kind: str,
    key: str,
    request_fingerprint: str,
    resource_id: str,
) -> None:
    """Record the key with the resource it created, in the caller's transaction (flushed here).

    Raises ``sqlalchemy.exc.IntegrityError`` when the key is already taken by a row that has not
    expired: another request with this key committed since :func:`find` (on PostgreSQL, this waits
    until a concurrent transaction holding the same key commits or rolls back)."""
    key_hash = _key_hash(kind, key)
    # An expired row of this key would block the INSERT: replace it. (The caller's find() saw no
    # valid row, and the cut-off here is later than find()'s, so a row left now is a new one.)
    session.execute(
        delete(IdempotencyKey)
        .where(
            IdempotencyKey.clinic_id == clinic_id,
            IdempotencyKey.key_hash == key_hash,
            IdempotencyKey.created_at < utcnow() - VALID_FOR,
        )
        .execution_options(synchronize_session=False)
    )
    session.add(
        IdempotencyKey(
            clinic_id=clinic_id,
            kind=kind,
            key_hash=key_hash,
            fingerprint=request_fingerprint,
            resource_id=resource_id,
            created_at=utcnow(),
        )
    )
    session.flush()
