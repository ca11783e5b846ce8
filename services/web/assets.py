"""The stylesheet and the script of the pages."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

router = APIRouter(include_in_schema=False)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_FILES = {"app.css": "text/css", "app.js": "text/javascript"}


@router.get("/static/{name}")
def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(
        STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=300"}
    )
