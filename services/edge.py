"""What every ``/v1`` request gets before and after its route, whatever the route.

- A write (``POST``/``PUT``/``PATCH``/``DELETE``) without an ``Authorization: Bearer`` header is
  answered 401 before its body is read: FastAPI parses a form before the key dependency runs, so
  anyone could make the API take in a 100 MiB upload to be told "missing API key" (the security
  review). A wrong key is still checked by the route, after the body (that needs the database).
- Answers carry ``Cache-Control: no-store`` unless the route set its own: they hold patients'
  grades, and a proxy or a shared browser must not keep them (the web pages already did this).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import error_response

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _has_bearer(scope: Scope) -> bool:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            return scheme.lower() == "bearer" and bool(credentials.strip())
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
        if scope["method"] in WRITES and not _has_bearer(scope):
            answer = error_response(
                401,
                "unauthorized",
                "missing API key: send `Authorization: Bearer <api key>`",
                {"WWW-Authenticate": "Bearer"},
            )
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
