"""Multipart requests with fields we do not know, or with a field given twice, are refused (a typo
such as ``left1``, or two photographs sent as ``left_1``, must not be silently ignored: a
photograph would never be screened)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import Depends, Request

from core.errors import InvalidInput


def reject_unknown_fields(*allowed: str) -> Any:
    known = frozenset(allowed)

    async def _check(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return  # FastAPI reports the missing fields itself
        form = await request.form()
        unknown = sorted({name for name in form if name not in known})
        if unknown:
            raise InvalidInput(
                f"unknown form field(s): {', '.join(unknown)[:200]}", {"allowed": sorted(known)}
            )
        counts = Counter(name for name, _ in form.multi_items())
        repeated = sorted(name for name, n in counts.items() if n > 1)
        if repeated:
            raise InvalidInput(
                f"form field(s) given more than once: {', '.join(repeated)[:200]}; "
                "send each photograph under its own field",
                {"allowed": sorted(known)},
            )

    return Depends(_check)
