"""What requests get before and after their route, whatever the route.

- A ``/v1`` write (``POST``/``PUT``/``PATCH``/``DELETE``) without an active API key in ``Authorization:
  Bearer`` is answered 401 before its body is read: FastAPI parses a form before the key
  dependency runs, so anyone could make the API take in a 100 MiB upload to be told "missing API
  key" (the security review), or "unknown key" with any made-up one. The route checks the key
  again (with its rate limit and the use recorded); a database that cannot answer here is left to
  the route (503).
- A web form that only a signed-in browser may send (uploads, searches, erasure, folder jobs:
  ``services.web.routes.SIGNED_IN_FORMS``) goes to the login page before its body is read when the
  browser has no live session: the same 100 MiB read as above, for anyone (session 24's leftover).
- ``/v1`` answers carry ``Cache-Control: no-store`` unless the route set its own: they hold patients'
  grades, and a proxy or a shared browser must not keep them (the web pages already did this).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import repository as repo
from services.deps import MAX_KEY_LENGTH
from services.errors import error_response
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
    """Whether ``key`` is certainly no active key (False when the database cannot say)."""
    try:
        with sessionmaker() as session:
            return repo.authenticate_api_key(session, key, touch=False) is None
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and path in self.signed_in_forms:
            request = Request(scope)
            sessionmaker = getattr(request.app.state, "sessionmaker", None)
            refused = sessionmaker is not None and await run_in_threadpool(
                auth.session_refused, request, sessionmaker
            )
            if refused:
                await auth.login_redirect(request)(scope, receive, send)
                return
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] in WRITES:
            key = _bearer(scope)
            sessionmaker = getattr(scope["app"].state, "sessionmaker", None)
            refused = key is None or (
                sessionmaker is not None and await run_in_threadpool(_key_refused, sessionmaker, key)
            )
            if refused:
                detail = (
                    "missing API key: send `Authorization: Bearer <api key>`"
                    if key is None
                    else "unknown or revoked API key"
                )
                answer = error_response(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})
                await answer(scope, receive, send)
                return

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, no_store)
