"""The OpenAPI document as integrators read it: error answers as the API really gives them.

FastAPI documents a 422 ``HTTPValidationError`` on every route with parameters; this API answers
validation errors with ``ErrorBody`` (services.errors), and a route whose only parameter is a
path id cannot answer 422 at all. Every ``/v1`` route can answer 503 (database down or busy,
services.errors), every ``/v1`` write 413 (a body over its limit, services.app.max_body_bytes),
and multipart uploads 400 (a malformed body the form parser refuses).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.edge import WRITES

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}
_JSON_ERROR = {"application/json": {"schema": ERROR_BODY}}


def _tidy_operation(path: str, method: str, op: dict[str, Any], form_body_bytes: int) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    params = op.get("parameters", [])
    body = op.get("requestBody", {}).get("content", {})
    if "422" in responses:
        if not body and all(p.get("in") == "path" for p in params):
            del responses["422"]  # a path id is any string: nothing to validate
        else:
            responses["422"] = {
                "description": "missing or invalid fields, or a file that is not a usable photograph",
                "content": _JSON_ERROR,
            }
    if path.startswith("/v1/"):
        responses.setdefault(
            "503",
            {"description": "the database is unavailable or busy (Retry-After)", "content": _JSON_ERROR},
        )
    if path.startswith("/v1/") and method.upper() in WRITES:  # services.app.max_body_bytes
        too_large = f"request body larger than {form_body_bytes // 1024} KiB"
        responses.setdefault("413", {"description": too_large, "content": _JSON_ERROR})
    if "multipart/form-data" in body:
        responses.setdefault(
            "400",
            {
                "description": "a malformed multipart body (no boundary, a part over 1 MiB that is "
                "not a file, more than 1000 fields or files)",
                "content": _JSON_ERROR,
            },
        )


def install_openapi(app: FastAPI, form_body_bytes: int) -> None:
    """Replace ``app.openapi`` with the tidied document (built once, like FastAPI's);
    ``form_body_bytes``: the body limit of the writes that carry no photograph."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            for path, item in doc.get("paths", {}).items():
                for method, op in item.items():
                    _tidy_operation(path, method, op, form_body_bytes)
            schemas = doc.get("components", {}).get("schemas", {})
            text = str(doc["paths"])
            for unused in ("HTTPValidationError", "ValidationError"):
                if unused in schemas and unused not in text:
                    del schemas[unused]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
