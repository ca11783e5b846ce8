"""What requests get before and after their route, whatever the route.

- A ``/v1`` write (``POST``/``PUT``/``PATCH``/``DELETE``) without an active API key in ``Authorization:
  Bearer`` is answered 401 before its body is read: FastAPI parses a form before the key
  dependency runs, so anyone could make the API take in a 100 MiB upload to be told "missing API
  key" (the security review), or "unknown key" with any made-up one. The route checks the key
  again (with its rate limit and the use recorded). A database that is down or saturated is
  answered 503 here, as the route would after waiting for it a second time.
- A web form that only a signed-in browser may send (uploads, searches, erasure, folder jobs:
  ``services.web.routes.SIGNED_IN_FORMS``) goes to the login page before its body is read when the
  browser has no live session: the same 100 MiB read as above, for anyone (session 24's leftover).
- ``/v1`` answers carry ``Cache-Control: no-store`` unless the route set its own: they hold patients'
  grades, and a proxy or a shared browser must not keep them (the web pages already did this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import repository as repo
from services.deps import MAX_KEY_LENGTH
from services.errors import DATABASE_UNAVAILABLE, database_unavailable, error_response
from services.web import auth

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            key = credentials.strip()
            return key if scheme.lower() == "bearer" and 0 < len(key) <= MAX_KEY_LENGTH else None
    return None


def _key_refused(sessionmaker: Any, key: str) -> bool:
    """Whether ``key`` is certainly no active key."""
    with sessionmaker() as session:
        return repo.authenticate_api_key(session, key, touch=False) is None


async def _in_thread(check: Callable[..., bool], *args: Any) -> bool | Response:
    """``check(*args)`` off the event loop: the 503 answer when the database is unavailable, and
    False (not refused: the route answers) when it fails for another reason."""
    try:
        return await run_in_threadpool(check, *args)
    except DATABASE_UNAVAILABLE as exc:
        return database_unavailable(None, exc)
    except SQLAlchemyError:
        return False


def route_path(scope: Scope) -> str:
    """The path below any root path (uvicorn --root-path, a mount): it is part of scope["path"]."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiEdge:
    def __init__(self, app: ASGIApp, signed_in_forms: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.signed_in_forms = signed_in_forms

    async def _refusal(self, scope: Scope, path: str) -> Response | None:
        """The answer given before the body is read, or None to go on to the route."""
        sessionmaker = getattr(scope["app"].state, "sessionmaker", None)
        if scope["method"] == "POST" and path in self.signed_in_forms:
            request = Request(scope)
            refused = sessionmaker is not None and await _in_thread(
                auth.session_refused, request, sessionmaker
            )
            if isinstance(refused, Response):
                return refused
            return auth.login_redirect(request) if refused else None
        if not path.startswith("/v1/") or scope["method"] not in WRITES:
            return None
        key = _bearer(scope)
        if key is None:
            detail = "missing API key: send `Authorization: Bearer <api key>`"
        else:
            refused = sessionmaker is not None and await _in_thread(_key_refused, sessionmaker, key)
            if isinstance(refused, Response):
                return refused
            if not refused:
                return None
            detail = "unknown or revoked API key"
        return error_response(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        answer = await self._refusal(scope, path)
        if answer is not None:
            await answer(scope, receive, send)
            return
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, no_store)
