"""API keys (stored as their sha256 only) and the browser sessions signed in with them."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from core import ledger
from core.db import at_commit
from core.errors import InvalidInput
from core.settings import get_settings
from core.tables import ApiKey, Clinic, WebSession, as_utc, utcnow

API_KEY_PREFIX = "drs_"
#: The column width (core.tables) that PostgreSQL enforces and SQLite does not.
KEY_LABEL_MAX = 200


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, clinic: Clinic, label: str | None = None) -> tuple[ApiKey, str]:
    """Create a key for ``clinic``. Returns the row and the plaintext key (shown once, never stored)."""
    if label is not None and len(label) > KEY_LABEL_MAX:
        raise InvalidInput(f"key label is longer than {KEY_LABEL_MAX} characters")
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(clinic_id=clinic.id, prefix=plaintext[:12], key_hash=hash_api_key(plaintext), label=label)
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate_api_key(session: Session, plaintext: str, *, touch: bool = True) -> ApiKey | None:
    """The active key matching ``plaintext`` (its ``clinic`` loaded), or None."""
    if not plaintext:
        return None
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is not None and touch:
        row.last_used_at = utcnow()
        session.flush()
    return row


def revoke_api_key(
    session: Session, key_id_or_prefix: str | int, store_dir: Path | None = None, *, record: bool = True
) -> int:
    """Revoke keys by id or by prefix (as printed by ``drscreen keys create``). Returns how many.
    Each revocation is also recorded, at the commit, in the restore ledger of ``store_dir``
    (default the configured store; core.ledger): a restore of an older backup revokes the key
    again. ``record=False``: revoke all the same where the ledger cannot be reached (a leaked key
    must not stay usable for want of a store; the caller warns)."""
    if isinstance(key_id_or_prefix, int) or str(key_id_or_prefix).isdigit():
        which = ApiKey.id == int(key_id_or_prefix)
    else:
        which = ApiKey.prefix == str(key_id_or_prefix)[:12]
    hashes = list(session.scalars(select(ApiKey.key_hash).where(which, ApiKey.revoked_at.is_(None))))
    if not hashes:
        return 0
    stmt = update(ApiKey).where(ApiKey.key_hash.in_(hashes), ApiKey.revoked_at.is_(None))
    result = session.execute(stmt.values(revoked_at=utcnow()).execution_options(synchronize_session=False))
    session.flush()
    if record:
        ledger_dir = store_dir if store_dir is not None else get_settings().store_path
        for key_hash in hashes:  # a revocation racing another is recorded twice: replaying it is harmless
            ledger.record(session, ledger_dir, ledger.revocation_entry(key_hash))
    return int(getattr(result, "rowcount", 0) or 0)


def list_api_keys(session: Session, clinic_id: int | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.id)
    if clinic_id is not None:
        stmt = stmt.where(ApiKey.clinic_id == clinic_id)
    return list(session.scalars(stmt))


def create_web_session(session: Session, key: ApiKey) -> str:
    """A new signed-in browser for ``key``: returns the token for its cookie (only its sha256 is
    kept, as for keys)."""
    token = secrets.token_urlsafe(32)
    session.add(WebSession(token_hash=hash_api_key(token), api_key_id=key.id))
    session.flush()
    return token


def web_session_key(
    session: Session, token: str, *, idle: timedelta, longest: timedelta, now: datetime | None = None
) -> ApiKey | None:
    """The active key of the session holding ``token``, or None: no such session, idle for longer
    than ``idle``, older than ``longest``, or its key revoked. Marks it seen (at most once a
    minute: every page would otherwise be a write)."""
    now = now or utcnow()
    row = session.execute(
        select(WebSession, ApiKey)
        .join(ApiKey, ApiKey.id == WebSession.api_key_id)
        .where(WebSession.token_hash == hash_api_key(token), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    web, key = row
    # plain statements, not the ORM row: a sign-out committed in between leaves them nothing to
    # do, where the ORM's flush would fail (StaleDataError: a 500; the review)
    if now - as_utc(web.last_seen_at) > idle or now - as_utc(web.created_at) > longest:
        session.execute(delete(WebSession).where(WebSession.id == web.id))
        return None
    if now - as_utc(web.last_seen_at) > timedelta(minutes=1):
        # at the commit: made here, SQLite's write lock was held while the page was read
        seen = update(WebSession).where(WebSession.id == web.id).values(last_seen_at=now)
        at_commit(session, lambda s: s.execute(seen))
    return key


def end_web_session(session: Session, token: str) -> int:
    """Sign a browser out (its cookie's token no longer works anywhere). Returns rows deleted."""
    result = session.execute(delete(WebSession).where(WebSession.token_hash == hash_api_key(token)))
    return int(getattr(result, "rowcount", 0) or 0)


def purge_web_sessions(
    session: Session, *, idle: timedelta, longest: timedelta, now: datetime | None = None
) -> int:
    """Delete sessions that can no longer be used (idle or too old); returns how many."""
    now = now or utcnow()
    result = session.execute(
        delete(WebSession).where(
            (WebSession.last_seen_at < now - idle) | (WebSession.created_at < now - longest)
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def count_clinics_with_keys(session: Session) -> int:
    """Clinics holding at least one API key that is not revoked."""
    return int(
        session.scalar(select(func.count(func.distinct(ApiKey.clinic_id))).where(ApiKey.revoked_at.is_(None)))
        or 0
    )
