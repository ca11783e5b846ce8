"""A photograph as a browser can show it: the uploaded original (TIFF converted to PNG) and its
heatmap, for the signed-in key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from core import repository as repo
from core.errors import NotFound
from core.store import FileStore
from ml.imageio import ImageDecodeError, sixteen_bit_png
from services.deps import ProducerDep, SessionDep, SettingsDep, audit
from services.errors import NotReady
from services.routes import images as image_routes
from services.views import private_image_headers
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

#: Photographs a browser shows as they are; anything else (TIFF) is converted to PNG.
BROWSER_IMAGE_TYPES = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "webp": "image/webp"}


@router.get("/images/{image_id}/photo")
def original_photo(
    image_id: str, request: Request, session: SessionDep, settings: SettingsDep, principal: WebPrincipal
) -> Response:
    """The uploaded photograph itself (the API serves only its heatmap)."""
    if principal is None:
        return Response("sign in first", status_code=401, media_type="text/plain")
    row = repo.get_image(session, image_id, principal.clinic_id)
    store = FileStore(settings.store_path)
    if row is None or not store.exists(row.stored_path):
        return Response("no such photograph", status_code=404, media_type="text/plain")
    data = store.read_bytes(row.stored_path)
    ext = row.stored_path.rsplit(".", 1)[-1].lower()
    media_type = BROWSER_IMAGE_TYPES.get(ext)
    if media_type is None or sixteen_bit_png(data):  # TIFF: browsers cannot show it
        # a 16-bit PNG is shown as graded: browsers ignore sBIT, so 12-bit data stored unscaled
        # (session 32) would show nearly black beside its grade
        try:
            data, media_type = _as_png(data, settings.max_image_pixels), "image/png"
        except ImageDecodeError as exc:
            why = f"the photograph cannot be shown: {exc}"
            return Response(why, status_code=422, media_type="text/plain")
    audit(session, principal, "photo.read", patient_id=row.patient_id, target_type="image", target_id=row.id)
    return Response(data, media_type=media_type, headers=private_image_headers())


def _as_png(data: bytes, max_pixels: int) -> bytes:
    """``max_pixels``: the uploads' limit (the decoder's own default, 40 M, is lower: a 46-M-pixel
    TIFF accepted at upload answered 500 here; the security review)."""
    import io

    from PIL import Image as PILImage

    from ml.imageio import decode_image
    from services.uploads import decode_slot

    buf = io.BytesIO()
    # bounded like an upload's check: Unavailable, answered 503 + Retry-After (services.errors)
    with decode_slot("too many photographs are being decoded at once; retry shortly"):
        PILImage.fromarray(decode_image(data, max_pixels=max_pixels)).save(buf, format="PNG")
    return buf.getvalue()


@router.get("/images/{image_id}/heatmap")
def heatmap(
    image_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    producer: ProducerDep,
    principal: WebPrincipal,
) -> Response:
    """``GET /v1/images/{id}/explanation`` for the signed-in key."""
    if principal is None:
        return Response("sign in first", status_code=401, media_type="text/plain")
    try:
        png = image_routes.get_explanation(request, image_id, session, principal, settings, producer)
    except NotReady:
        return Response(
            "not ready yet", status_code=409, media_type="text/plain", headers={"Retry-After": "2"}
        )
    except NotFound as exc:
        return Response(exc.message, status_code=404, media_type="text/plain")
    png.headers.update(private_image_headers())
    return png
