"""Validation of uploaded photographs at the edge, before anything is written.

Every file is read with a hard size cap and fully decoded (``ml.imageio.decode_image``: empty,
not-an-image, truncated, corrupt, decompression bombs, too small). Only then is it stored
(content addressed: the same bytes are kept once) and does a row get created.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import UploadFile
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import InvalidImage, TooLarge, Unavailable
from core.store import FileStore, StoredFile
from core.tables import Image
from ml.imageio import TOO_LARGE, ImageDecodeError, check_image, sniff_format

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Decoding is the memory-heavy step of an upload (a 50-megapixel RGBA PNG of 200 kB decodes to
# 200 MB): at most one decode per core runs at once, other uploads wait for a slot, so memory
# stays bounded however many requests arrive together.
DECODE_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 2)
#: Longest an upload waits for a decode slot before it is answered 503 (a flood of slow uploads
#: must not hold every request thread: the session 17 review saw another clinic's GET take 16 s).
DECODE_WAIT_S = 10.0


@contextmanager
def decode_slot(busy: str) -> Iterator[None]:
    """Hold one of ``DECODE_SLOTS`` while decoding; ``Unavailable`` (503 + Retry-After) saying
    ``busy`` when none frees up within ``DECODE_WAIT_S``."""
    if not DECODE_SLOTS.acquire(timeout=DECODE_WAIT_S):
        raise Unavailable(busy)
    try:
        yield
    finally:
        DECODE_SLOTS.release()


@dataclass(frozen=True)
class Photo:
    """A validated photograph, not stored yet."""

    field: str
    data: bytes
    fmt: str
    width: int
    height: int
    filename: str | None
    content_type: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_capped(upload: UploadFile, limit: int, field: str) -> bytes:
    """The upload's bytes; ``TooLarge`` as soon as more than ``limit`` bytes arrive."""
    parts: list[bytes] = []
    size = 0
    upload.file.seek(0)
    while chunk := upload.file.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"{field}: the file is larger than {limit // (1024 * 1024)} MiB",
                {"field": field, "reason": "too_large"},
            )
        parts.append(chunk)
    return b"".join(parts)


def validate_photo(upload: UploadFile, field: str, *, max_bytes: int, max_pixels: int) -> Photo:
    data = read_capped(upload, max_bytes, field)
    try:
        # Only the size is kept here (the worker decodes again from the store), so a big JPEG
        # is decoded at a reduced DCT scale and nothing is converted: every byte is still checked.
        busy = f"{field}: too many photographs are being checked at once; nothing was saved, retry shortly"
        with decode_slot(busy):
            height, width = check_image(data, max_pixels=max_pixels, min_side=256)
    except ImageDecodeError as exc:
        detail = {"field": field, "reason": exc.reason}
        if exc.reason == TOO_LARGE:
            raise TooLarge(f"{field}: {exc.detail}", detail) from None
        raise InvalidImage(f"{field}: {exc.detail}", detail) from None
    fmt = sniff_format(data) or "bin"
    return Photo(
        field, data, fmt, width, height, _safe_name(upload.filename), _safe_content_type(upload.content_type)
    )


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())


def _safe_name(filename: str | None) -> str | None:
    """The client's file name, for display only: no folders, no control characters (PostgreSQL
    refuses a NUL: the security review's upload answered 500 after its bytes were stored),
    bounded length."""
    if not filename:
        return None
    return _printable(filename.replace("\\", "/").rsplit("/", 1)[-1])[:255] or None


def _safe_content_type(content_type: str | None) -> str | None:
    """The part's declared type, informational only (the format is sniffed): printable, at most
    the column's 100 characters (a longer one answered 500 on PostgreSQL)."""
    if not content_type:
        return None
    return _printable(content_type)[:100] or None


#: What a clinic is told when the store cannot take a photograph (its path and the error are the
#: operator's: in the server log).
STORE_UNAVAILABLE = (
    "photographs cannot be stored right now (a server problem): nothing was recorded, send it again later"
)


def store_photo(store: FileStore, photo: Photo) -> StoredFile:
    """The photograph in the store; :class:`Unavailable` (503) when the store cannot be written
    (read-only, full, a mount gone: the fault review's 500 "an unexpected error occurred")."""
    ext = "jpg" if photo.fmt == "jpeg" else photo.fmt
    try:
        return store.put_bytes(photo.data, ext)
    except OSError as exc:
        log.error("the file store %s cannot be written: %s", store.root, exc)
        raise Unavailable(STORE_UNAVAILABLE) from exc


def store_photos(store: FileStore, photos: list[Photo]) -> list[StoredFile]:
    """Every photograph of a request stored, or none: the files this call wrote are removed when a
    later one cannot be stored (no row will ever name them, so no erasure would find them). A
    request with the same bytes that committed meanwhile stores its photographs again after its
    commit (``commit_and_enqueue``)."""
    stored: list[StoredFile] = []
    try:
        for photo in photos:
            stored.append(store_photo(store, photo))
    except Unavailable:
        for file in stored:
            if file.created:
                try:
                    store.delete(file.relpath)
                except OSError:
                    log.warning("could not remove %s after a failed upload", file.relpath)
        raise
    return stored


def record_photo(
    session: Session,
    *,
    clinic_id: int,
    patient_id: int,
    eye: str,
    photo: Photo,
    stored: StoredFile,
    bundle_id: str | None = None,
) -> Image:
    """The image row of a validated, stored photograph (status ``queued``)."""
    return repo.create_image(
        session,
        clinic_id=clinic_id,
        patient_id=patient_id,
        eye=eye,
        sha256=stored.sha256,
        stored_path=stored.relpath,
        size_bytes=stored.size_bytes,
        width=photo.width,
        height=photo.height,
        filename=photo.filename,
        content_type=photo.content_type,
        bundle_id=bundle_id,
    )
