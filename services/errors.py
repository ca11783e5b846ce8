"""One place that turns errors into the contract's JSON body ``{"error": ..., "detail": ...}``.

Domain errors (``core.errors``) carry no HTTP codes; the mapping lives here. Validation errors are
reported without the offending input (it may be a photograph or a patient identifier).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import errors
from core.schemas import ErrorBody

log = logging.getLogger(__name__)

# Most specific first: TooLarge and InvalidImage are InvalidInput subclasses.
STATUS_BY_ERROR: list[tuple[type[errors.DomainError], int]] = [
    (errors.TooLarge, 413),
    (errors.InvalidImage, 422),
    (errors.InvalidInput, 422),
    (errors.NotFound, 404),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.Conflict, 409),
    (errors.Unavailable, 503),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "rate_limited",
    503: "unavailable",
}


class NotReady(errors.Conflict):
    """The resource exists but is not computed yet (retry later)."""

    code = "not_ready"


class RateLimited(errors.DomainError):
    code = "rate_limited"

    def __init__(self, retry_after: float) -> None:
        # whole seconds, rounded up, as the Retry-After header says (0.0 told clients to retry at once)
        self.retry_seconds = max(1, math.ceil(retry_after))
        super().__init__("too many requests for this API key", {"retry_after_seconds": self.retry_seconds})
        self.retry_after = retry_after


def status_for(exc: errors.DomainError) -> int:
    if isinstance(exc, RateLimited):
        return 429
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 400


def error_response(
    status: int, code: str, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=code, detail=detail).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def headers_for(exc: errors.DomainError) -> dict[str, str]:
    """The HTTP headers a domain error's answer carries (JSON API and web pages alike)."""
    headers: dict[str, str] = {}
    if status_for(exc) == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_seconds)
    if isinstance(exc, NotReady):
        headers["Retry-After"] = "2"
    if isinstance(exc, errors.Unavailable):
        headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return headers


def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.DomainError)
    status, headers = status_for(exc), headers_for(exc)
    detail: Any = exc.message
    if isinstance(exc.detail, dict):
        detail = {"message": exc.message, **exc.detail}
    elif exc.detail is not None:
        detail = exc.detail
    return error_response(status, exc.code, detail, headers or None)


def _clean_validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """Keep location, message and type; drop ``input``/``ctx`` (uploads, identifiers, bytes)."""
    out = []
    for err in raw:
        loc = [str(p) for p in err.get("loc", ())]
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_input", _clean_validation_errors(list(exc.errors())))


#: Renders the web interface's "not found" page for a browser (``services.web``).
NotFoundPage = Callable[[Request], Response]


def _wants_page(request: Request) -> bool:
    """A browser asking for a page outside the API (a stale bookmark, a mistyped address): it
    got the API's JSON error (the web walkthrough)."""
    return (
        request.method == "GET"
        and not request.url.path.startswith("/v1/")
        and "text/html" in request.headers.get("accept", "")
    )


def _http_error(request: Request, exc: Exception, not_found_page: NotFoundPage | None = None) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and not_found_page is not None and _wants_page(request):
        return not_found_page(request)
    code = _HTTP_CODES.get(exc.status_code, "error")
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, exc.detail, headers)


#: Seconds a client is asked to wait before retrying when the database is down or saturated.
DATABASE_RETRY_AFTER = 5
#: Largest ``offset`` a paged list takes (larger ones overflowed the databases' integers: 500).
MAX_OFFSET = 2**31 - 1
#: Connection refused or lost, SQLite locked, pool exhausted (``sa_exc.TimeoutError``).
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.TimeoutError)


def database_unavailable(_request: Request | None, exc: Exception) -> JSONResponse:
    """The database is unreachable, locked, or every pooled connection is busy: a dependency is
    down or saturated, not a bug, so 503 and a retry hint (the transaction was rolled back)."""
    log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:200])
    return error_response(
        503,
        "unavailable",
        "the database is unavailable or busy; nothing was saved, retry shortly",
        {"Retry-After": str(DATABASE_RETRY_AFTER)},
    )


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log; the client gets no internals.
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI, not_found_page: NotFoundPage | None = None) -> None:
    app.add_exception_handler(errors.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, partial(_http_error, not_found_page=not_found_page))
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, database_unavailable)
    app.add_exception_handler(Exception, _unexpected)


#: OpenAPI ``responses=`` entries for the error shapes every route can answer.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "missing, unknown or revoked API key",
        403: "not allowed (e.g. a folder outside the import roots)",
        404: "unknown id, or an id of another clinic",
        409: "conflict (e.g. an Idempotency-Key reused for another request, a result not ready yet)",
        413: "upload or photograph over the configured limits",
        422: "missing or invalid fields, or a file that is not a usable photograph",
        429: "rate limit of the API key exceeded",
        503: "a dependency is unavailable",
    }
    return {s: {"model": ErrorBody, "description": descriptions.get(s, "error")} for s in statuses}
