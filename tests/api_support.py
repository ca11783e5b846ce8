"""Helpers shared by the API tests (unit, integration, e2e): clinics and keys, sample photographs,
bad files, and polling."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import repository as repo
from core.db import session_scope

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "samples"
#: The small ensemble trained in the repository for tests (fast on CPU).
DEV_MODEL = "drscreen-dev@0.1.0"


def model_env() -> dict[str, str]:
    """``DRSCREEN_MODEL`` for the tests, and ``DRSCREEN_MODELS_DIR`` when
    ``DRSCREEN_TEST_MODELS_DIR`` points the tests at another models folder."""
    env = {"DRSCREEN_MODEL": os.environ.get("DRSCREEN_TEST_MODEL", DEV_MODEL)}
    if os.environ.get("DRSCREEN_TEST_MODELS_DIR"):
        env["DRSCREEN_MODELS_DIR"] = os.environ["DRSCREEN_TEST_MODELS_DIR"]
    return env


@dataclass(frozen=True)
class Key:
    clinic_id: int
    key_id: int
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def web_cookie(client: Any, key: Key) -> dict[str, str]:
    """The ``Cookie`` header of a web interface sign-in with ``key``, through ``POST /login`` (the
    client's own cookie jar is emptied again: a request without this header is signed out)."""
    from services.web.auth import COOKIE_NAME

    answer = client.post("/login", data={"api_key": key.key}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    token = answer.cookies[COOKIE_NAME]
    client.cookies.clear()
    return {"Cookie": f"{COOKIE_NAME}={token}"}


def make_key(url: str, clinic: str) -> Key:
    with session_scope(url) as session:
        row_clinic = repo.get_or_create_clinic(session, clinic)
        row, plaintext = repo.create_api_key(session, row_clinic)
        return Key(row_clinic.id, row.id, plaintext)


def revoke(url: str, key: Key) -> None:
    with session_scope(url) as session:
        repo.revoke_api_key(session, key.key_id, record=False)  # no store in most tests: no ledger line


def sample(patient: str, eye: str) -> Path:
    return SAMPLES / patient / f"{patient}_{eye}.jpg"


def sample_bytes(patient: str, eye: str) -> bytes:
    return sample(patient, eye).read_bytes()


def png_bytes(width: int = 128, height: int = 96) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 20)).save(buf, format="PNG")
    return buf.getvalue()


def _overwritten_in_scan(jpeg: bytes, where: float, fill: bytes) -> bytes:
    scan = jpeg.find(b"\xff\xda")
    at = scan + int((len(jpeg) - scan) * where)
    return jpeg[:at] + fill + jpeg[at + len(fill) :]


def bad_files() -> dict[str, bytes]:
    """Uploads that must all be refused with a 4xx."""
    jpeg = sample_bytes("19", "left")
    return {
        "empty": b"",
        "text": b"patient notes: nothing to see here\n" * 20,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        # cut short, then closed with an end marker: decodes, with a flat grey lower half
        "truncated_closed_jpeg": jpeg[: len(jpeg) // 2] + b"\xff\xd9",
        "corrupt_jpeg": jpeg[:600] + bytes(range(256)) * 8 + b"\xff\xd9",
        # 16 bytes overwritten inside the scan: Pillow decodes it silently, libjpeg warns (session 23)
        "damaged_scan_jpeg": _overwritten_in_scan(jpeg, 0.7, b"\x55" * 16),
        "gif": b"GIF89a" + b"\x00" * 64,
        "tiny_png": png_bytes(16, 16),
        # colours reduced to 256: graded lower, every quality check passed (session 31)
        "palette_png": _palette_png(jpeg),
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    }


def _palette_png(jpeg: bytes) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.open(io.BytesIO(jpeg)).convert("P", palette=PILImage.Palette.ADAPTIVE).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    value = fetch()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last: {value}")
        time.sleep(0.5)
        value = fetch()
    return value
