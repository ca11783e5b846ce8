"""Request dependencies: one database session (unit of work) per request, and API-key auth."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, object_session

from core import db
from core import repository as repo
from core.errors import Unauthorized
from core.settings import Settings
from core.tables import ApiKey, as_utc, utcnow
from services.config import ApiSettings
from services.errors import RateLimited
from services.ratelimit import RateLimiter

TOUCH_EVERY = timedelta(minutes=5)

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <api key>`; keys are created with `drscreen keys create`.",
)


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_api_settings_dep(request: Request) -> ApiSettings:
    api_settings: ApiSettings = request.app.state.api_settings
    return api_settings


def get_producer(request: Request) -> Celery:
    producer: Celery = request.app.state.producer
    return producer


def get_session(request: Request) -> Iterator[Session]:
    """One unit of work: commit when the route returns normally, roll back on any error.

    Used with ``scope="function"`` so the commit happens before the response is sent: a client
    never sees a 2xx for a write that then fails to commit."""
    settings: Settings = request.app.state.settings
    with db.session_scope(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ApiSettingsDep = Annotated[ApiSettings, Depends(get_api_settings_dep)]
ProducerDep = Annotated[Celery, Depends(get_producer)]


#: Longest API key looked up, from a header or the sign-in form (keys are 47 characters; this
#: only bounds the work).
MAX_KEY_LENGTH = 256


@dataclass(frozen=True)
class Principal:
    """Who is calling: the clinic and the key (ids only; the key itself is never kept)."""

    clinic_id: int
    api_key_id: int


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing API key: send `Authorization: Bearer <api key>`")
    key = repo.authenticate_api_key(session, credentials.credentials.strip(), touch=False)
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    return principal_for_key(request, key)


def principal_for_key(request: Request, key: ApiKey) -> Principal:
    """The caller behind an active ``key`` (from a bearer header or a web sign-in): the key's use
    is recorded and its rate limit applies (:class:`RateLimited`, answered 429)."""
    _touch(key)
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.acquire(key.id)
    if wait > 0:
        raise RateLimited(wait)
    # The metrics middleware and the access log see only the key's row id, never the key.
    request.state.api_key_id = key.id
    return Principal(clinic_id=key.clinic_id, api_key_id=key.id)


def _touch(key: ApiKey) -> None:
    """Record when a key was last used, at most every few minutes: writing on every request would
    turn each read into a write. At the commit (``db.at_commit``): set now, the request's first
    query flushed it and SQLite's write lock was held for the whole request."""
    now = utcnow()
    last = key.last_used_at
    session = object_session(key)
    if session is not None and (last is None or now - as_utc(last) > TOUCH_EVERY):

        def touch(_session: Session) -> None:
            key.last_used_at = now

        db.at_commit(session, touch)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def audit(
    session: Session,
    principal: Principal,
    action: str,
    *,
    patient_id: int | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record who (clinic and key ids) read or wrote what; committed with the request's work.
    Written at the commit (``db.at_commit``): a read that wrote its audit row first held SQLite's
    write lock while it read, and every upload and worker write waited for it."""
    at = utcnow()  # when it was asked, not when the commit came

    def record(s: Session) -> None:
        repo.record_audit(
            s,
            action=action,
            clinic_id=principal.clinic_id,
            api_key_id=principal.api_key_id,
            patient_id=patient_id,
            target_type=target_type,
            target_id=target_id,
            detail=detail,
            at=at,
        )

    db.at_commit(session, record)
