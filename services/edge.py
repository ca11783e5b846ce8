"""What every ``/v1`` request gets before and after its route, whatever the route.

- A write (``POST``/``PUT``/``PATCH``/``DELETE``) without an active API key in ``Authorization:
  Bearer`` is answered 401 before its body is read: FastAPI parses a form before the key
  dependency runs, so anyone could make the API take in a 100 MiB upload to be told "missing API
  key" (the security review), or "unknown key" with any made-up one. The route checks the key
  again (with its rate limit and the use recorded); a database that cannot answer here is left to
  the route (503).
- Answers carry ``Cache-Control: no-store`` unless the route set its own: they hold patients'
  grades, and a proxy or a shared browser must not keep them (the web pages already did this).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import repository as repo
from services.deps import MAX_KEY_LENGTH
from services.errors import error_response

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


class ApiEdge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the path below any root path (uvicorn --root-path, a mount): it is part of scope["path"]
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["type"] != "http" or not path.startswith("/v1/"):
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
