"""Signing in to the web interface with an API key, checked exactly like ``/v1``.

Signing in creates a session (``core.tables.WebSession``): the cookie holds a random token, not
the key (the security review: a cookie read once was the clinic's key until an operator revoked
it). The session ends on sign-out, after ``DRSCREEN_WEB_SESSION_IDLE_HOURS`` without a page, after
``DRSCREEN_WEB_SESSION_MAX_HOURS`` whatever, and with its key's revocation. The cookie is HttpOnly
(no script can read it), SameSite=Strict (never sent by another site's page, so forms cannot be
forged from elsewhere) and Secure when the page is served over https. Each request is then the
key's, through :func:`services.deps.principal_for_key`: same revocation, same rate limit, same
clinic isolation as the API.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from core import repository as repo
from core.tables import ApiKey
from services.config import ApiSettings
from services.deps import MAX_KEY_LENGTH, Principal, principal_for_key

COOKIE_NAME = "drscreen_session"
#: The cookie of the versions before sessions (session 24): it held the API key. The server
#: ignores it; the next sign-in or sign-out deletes it.
OLD_KEY_COOKIE = "drscreen_key"
#: Longest cookie value looked up (tokens are 43 characters).
MAX_TOKEN_LENGTH = 128


def valid_key(session: Session, key: str) -> ApiKey | None:
    """The API's key check (``core.repository.authenticate_api_key``), without side effects."""
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    return repo.authenticate_api_key(session, key, touch=False)


def _lifetimes(request: Request) -> tuple[timedelta, timedelta]:
    api: ApiSettings = request.app.state.api_settings
    return timedelta(hours=api.web_session_idle_hours), timedelta(hours=api.web_session_max_hours)


def _cookie_token(request: Request) -> str | None:
    """The session token the browser sent, when it could be one."""
    token = request.cookies.get(COOKIE_NAME)
    return token if token and len(token) <= MAX_TOKEN_LENGTH else None


def _session_key(request: Request, session: Session) -> ApiKey | None:
    """The active key of the browser's live session (``repository.web_session_key``), or None."""
    token = _cookie_token(request)
    if token is None:
        return None
    idle, longest = _lifetimes(request)
    return repo.web_session_key(session, token, idle=idle, longest=longest)


def session_refused(request: Request, sessionmaker: Callable[[], Session]) -> bool:
    """Whether the browser certainly has no live session: the edge's check before a signed-in
    form's body is read (``services.edge``, which answers database errors). Nothing is committed:
    the route's own check marks the session seen."""
    with sessionmaker() as session:  # no connection is opened without a cookie
        return _session_key(request, session) is None


def principal_from_cookie(request: Request, session: Session) -> Principal | None:
    """Who is signed in, or None (no cookie, or a session that ended: signed out, idle, too old,
    or its key revoked by now).

    Rate limiting is the API's: :class:`services.errors.RateLimited` propagates (answered 429)."""
    key = _session_key(request, session)
    return None if key is None else principal_for_key(request, key)


def signed_in(request: Request, session: Session) -> bool:
    """Whether the cookie names a live session (for a page's header only: no rate limit, no use
    of the key recorded)."""
    return _session_key(request, session) is not None


def _clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path="/", httponly=True, samesite="strict", secure=is_https(request))


def _end_previous(response: Response, request: Request, session: Session) -> None:
    """End the session the browser arrived with, and drop the cookie of the versions before
    sessions (``drscreen_key``: it held the API key itself)."""
    token = _cookie_token(request)
    if token is not None:
        repo.end_web_session(session, token)
    if OLD_KEY_COOKIE in request.cookies:
        _clear_cookie(response, request, OLD_KEY_COOKIE)


def sign_in(response: Response, request: Request, session: Session, key: ApiKey) -> None:
    """Start a session for ``key`` and give the browser its cookie; the browser's previous
    session ends (it stayed valid beside the new one: the review), and sessions that can no
    longer be used are deleted on the way (no other job is needed for them)."""
    idle, longest = _lifetimes(request)
    _end_previous(response, request, session)
    repo.purge_web_sessions(session, idle=idle, longest=longest)
    response.set_cookie(
        COOKIE_NAME,
        repo.create_web_session(session, key),
        httponly=True,
        samesite="strict",
        secure=is_https(request),
        path="/",
    )


def sign_out(response: Response, request: Request, session: Session) -> None:
    """End the browser's session (its token stops working everywhere) and clear the cookie."""
    _end_previous(response, request, session)
    _clear_cookie(response, request, COOKIE_NAME)


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def safe_next(target: str | None) -> str:
    """A local path to go back to after signing in; anything else (other hosts, ``//evil``) -> ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


#: Forms posted only to read (a patient id kept out of the URL): nothing of theirs is lost.
READ_ONLY_FORMS = frozenset({"/patients"})


def login_redirect(request: Request) -> RedirectResponse:
    """Send a signed-out visitor to the login form, remembering the page they asked for."""
    here = request.url.path
    if request.method != "GET":
        # a form's POST route has no page to come back to (signing in ended on a 405): the page
        # the form was on, when the browser names it (a grader's grade saved after the session
        # ended went back to the home page: session 26's leftover), else the form's own page
        here = _form_page(request) or (
            "/patients" if here.startswith("/patients") else "/jobs" if here == "/jobs" else "/"
        )
    query = [] if here == "/" else [f"next={quote(here, safe='/')}"]
    if request.method != "GET" and request.url.path not in READ_ONLY_FORMS:
        # what the form sent was not saved: the sign-in page says so (staff took the silent
        # redirect for a saved upload: the clinician's review, session 29)
        query.append("unsaved=1")
    return RedirectResponse("/login" + ("?" + "&".join(query) if query else ""), status_code=303)


def _form_page(request: Request) -> str | None:
    """The local page a form was posted from (its Referer, on this host), or None."""
    referer = request.headers.get("referer")
    if referer is None:
        return None
    parts = urlsplit(referer)
    if parts.netloc != request.headers.get("host", "") or parts.path in ("", "/login"):
        return None
    page = parts.path + (f"?{parts.query}" if parts.query else "")
    return page if safe_next(page) == page else None


def same_origin(request: Request) -> bool:
    """Defence in depth for form posts (SameSite=Strict already keeps the cookie off cross-site
    requests): when the browser names the page's origin, it must be this host."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc == host
    # No Origin (old browsers, some privacy settings): what else the browser says must agree
    # (the security review posted with another site's Referer and no Origin, and got through).
    # A client that sends neither is no browser page of another site: let it through.
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    referer = request.headers.get("referer")
    return referer is None or urlsplit(referer).netloc == host
