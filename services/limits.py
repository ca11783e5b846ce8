"""Request body size limit, enforced before any route reads the body.

``Content-Length`` over the limit is refused at once; a body streamed without one (chunked) is
counted as it arrives and refused as soon as it passes the limit, so a client cannot make the API
spool gigabytes to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import error_response


class _TooLarge(Exception):
    """Raised from ``receive`` to stop reading an oversized body."""


class BodySizeLimit:
    """``max_bytes(scope)`` gives the request's limit; it is read per request because the settings
    are only known once the app has started, and a limit may depend on the route."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[Any], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
        response = error_response(413, "too_large", f"request body larger than {size}")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await self._refuse(limit, scope, receive, send)
                    return
            except ValueError:
                pass
        seen = 0
        state: dict[str, Any] = {"too_large": False, "started": False}

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    state["too_large"] = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body is known to be too large, whatever the app answers (FastAPI turns a
            # failed body read into a 400) is replaced by our 413.
            if state["too_large"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # _TooLarge itself, or whatever the app wrapped it in.
            if not state["too_large"]:
                raise
        if state["too_large"] and not state["started"]:
            await self._refuse(limit, scope, receive, send)
