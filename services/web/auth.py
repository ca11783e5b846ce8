"""Signing in to the web interface: the API key, kept in a cookie, checked exactly like ``/v1``.

The key goes into an HttpOnly (no script can read it), SameSite=Strict (never sent by another site's
page, so forms cannot be forged from elsewhere) cookie, Secure when the page is served over https.
It lives for the browser session only. Each request is then authenticated by
:func:`services.deps.get_principal`, the API's own dependency: same key check, same revocation,
same rate limit, same clinic isolation.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import Unauthorized
from services.deps import Principal, get_principal

COOKIE_NAME = "drscreen_key"
#: Longest key accepted from the login form (keys are far shorter; this only bounds the work).
MAX_KEY_LENGTH = 256


def key_is_valid(session: Session, key: str) -> bool:
    """The API's key check (``core.repository.authenticate_api_key``), without side effects."""
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        return False
    return repo.authenticate_api_key(session, key, touch=False) is not None


def principal_from_cookie(request: Request, session: Session) -> Principal | None:
    """Who is signed in, or None (no cookie, or a key that is unknown or revoked by now).

    Rate limiting is the API's: :class:`services.errors.RateLimited` propagates (answered 429)."""
    key = request.cookies.get(COOKIE_NAME)
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)
    try:
        return get_principal(request, session, credentials)
    except Unauthorized:
        return None


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_key_cookie(response: Response, request: Request, key: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        key.strip(),
        httponly=True,
        samesite="strict",
        secure=is_https(request),
        path="/",
    )


def clear_key_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict", secure=is_https(request))


def safe_next(target: str | None) -> str:
    """A local path to go back to after signing in; anything else (other hosts, ``//evil``) -> ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def login_redirect(request: Request) -> RedirectResponse:
    """Send a signed-out visitor to the login form, remembering the page they asked for."""
    here = request.url.path
    if request.method != "GET":
        # a form's POST route has no page to come back to (signing in ended on a 405): its form's
        here = "/patients" if here.startswith("/patients") else "/jobs" if here == "/jobs" else "/"
    target = "/login" if here == "/" else f"/login?next={here}"
    return RedirectResponse(target, status_code=303)


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
