"""Every kind of bad input, once, with the exact status and error code it must get and nothing
written. The table in docs/reliability.md is this test's output: with ``DRSCREEN_TEST_FAULT_REPORT``
set, each case is appended there as a JSON line (``{"input": ..., "status": ..., "error": ...}``).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core import migrate
from core.db import session_scope
from core.settings import get_settings
from core.tables import Bundle, Image, Patient, ScoringJob
from services.app import create_app
from services.config import get_api_settings
from tests.api_support import Key, bad_files, make_key, png_bytes, revoke, sample_bytes


def _corrupt_png() -> bytes:
    data = bytearray(png_bytes(200, 200))
    data[-20] ^= 0xFF  # inside the IDAT/IEND: CRC no longer matches
    return bytes(data)


def _png_bomb(side: int = 20_000) -> bytes:
    """A valid PNG header claiming side x side pixels, with a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    rows = zlib.compress(b"\x00" * (side + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _pdf() -> bytes:
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def _jpeg_without_end() -> bytes:
    data = sample_bytes("19", "left")
    return data[: data.rindex(b"\xff\xd9")]


def _one(client: TestClient, key: Key, data: bytes, **form: str) -> Any:
    fields = {"patient_id": "m-1", "eye": "left"} | form
    return client.post("/v1/images", headers=key.headers, data=fields, files={"file": ("x.jpg", data)})


Case = tuple[str, int, str, Callable[[TestClient, Key], Any]]


def _cases(root: Path, outside: Path) -> list[Case]:
    good = sample_bytes("19", "left")
    files = bad_files()
    cases: list[Case] = [
        # photographs
        ("empty file", 422, "invalid_image", lambda c, k: _one(c, k, files["empty"])),
        ("text file named .jpg", 422, "invalid_image", lambda c, k: _one(c, k, files["text"])),
        ("PDF document", 422, "invalid_image", lambda c, k: _one(c, k, _pdf())),
        ("GIF (unsupported format)", 422, "invalid_image", lambda c, k: _one(c, k, files["gif"])),
        (
            "HEIC (unsupported format, session 31)",
            422,
            "invalid_image",
            lambda c, k: _one(c, k, files["heic"]),
        ),
        (
            "palette PNG, 256 colours (session 31)",
            422,
            "invalid_image",
            lambda c, k: _one(c, k, files["palette_png"]),
        ),
        ("JPEG truncated at half", 422, "invalid_image", lambda c, k: _one(c, k, files["truncated_jpeg"])),
        (
            "JPEG cut at half and closed with `FFD9` (session 19)",
            422,
            "invalid_image",
            lambda c, k: _one(c, k, files["truncated_closed_jpeg"]),
        ),
        ("JPEG without end marker", 422, "invalid_image", lambda c, k: _one(c, k, _jpeg_without_end())),
        ("JPEG with garbage scan data", 422, "invalid_image", lambda c, k: _one(c, k, files["corrupt_jpeg"])),
        (
            "JPEG with 16 bytes overwritten in its scan",
            422,
            "invalid_image",
            lambda c, k: _one(c, k, files["damaged_scan_jpeg"]),
        ),
        ("PNG truncated", 422, "invalid_image", lambda c, k: _one(c, k, png_bytes(300, 300)[:200])),
        ("PNG with a bad CRC", 422, "invalid_image", lambda c, k: _one(c, k, _corrupt_png())),
        ("image under 64 px", 422, "invalid_image", lambda c, k: _one(c, k, files["tiny_png"])),
        ("decompression bomb (20000x20000 PNG)", 413, "too_large", lambda c, k: _one(c, k, _png_bomb())),
        (
            "file over DRSCREEN_MAX_UPLOAD_MB",
            413,
            "too_large",
            lambda c, k: _one(c, k, os.urandom(1_100_000)),
        ),
        ("request body over the limit", 413, "too_large", lambda c, k: _one(c, k, os.urandom(6_000_000))),
        # fields
        (
            "missing patient_id",
            422,
            "invalid_input",
            lambda c, k: c.post(
                "/v1/images", headers=k.headers, data={"eye": "left"}, files={"file": ("a", good)}
            ),
        ),
        (
            "missing file",
            422,
            "invalid_input",
            lambda c, k: c.post("/v1/images", headers=k.headers, data={"patient_id": "m-1", "eye": "left"}),
        ),
        ("wrong eye value", 422, "invalid_input", lambda c, k: _one(c, k, good, eye="middle")),
        ("patient_id with ../", 422, "invalid_input", lambda c, k: _one(c, k, good, patient_id="../etc")),
        (
            "patient_id of 129 chars",
            422,
            "invalid_input",
            lambda c, k: _one(c, k, good, patient_id="p" * 129),
        ),
        ("extra form field", 422, "invalid_input", lambda c, k: _one(c, k, good, colour="blue")),
        (
            "JSON body instead of a form",
            422,
            "invalid_input",
            lambda c, k: c.post("/v1/images", headers=k.headers, json={"patient_id": "m", "eye": "left"}),
        ),
        (
            "bundle without photographs",
            422,
            "invalid_input",
            lambda c, k: c.post("/v1/bundles", headers=k.headers, data={"patient_id": "m-1"}),
        ),
        (
            "bundle with a misspelt field (left1)",
            422,
            "invalid_input",
            lambda c, k: c.post(
                "/v1/bundles", headers=k.headers, data={"patient_id": "m-1"}, files={"left1": ("a.jpg", good)}
            ),
        ),
        (
            "bundle with one truncated photograph",
            422,
            "invalid_image",
            lambda c, k: c.post(
                "/v1/bundles",
                headers=k.headers,
                data={"patient_id": "m-1"},
                files={"left_1": ("l.jpg", good), "right_1": ("r.jpg", files["truncated_jpeg"])},
            ),
        ),
        # folder jobs
        (
            "job: malformed JSON",
            422,
            "invalid_input",
            lambda c, k: c.post("/v1/jobs", headers=k.headers, content=b"{"),
        ),
        (
            "job: extra field",
            422,
            "invalid_input",
            lambda c, k: c.post("/v1/jobs", headers=k.headers, json={"folder": str(root), "x": 1}),
        ),
        ("job: folder outside the import roots", 403, "forbidden", lambda c, k: _job(c, k, str(outside))),
        ("job: .. escaping the roots", 403, "forbidden", lambda c, k: _job(c, k, f"{root}/a/../../outside")),
        ("job: symlink escaping the roots", 403, "forbidden", lambda c, k: _job(c, k, str(root / "escape"))),
        ("job: relative path", 422, "invalid_input", lambda c, k: _job(c, k, "relative/path")),
        ("job: missing folder", 422, "invalid_input", lambda c, k: _job(c, k, str(root / "missing"))),
        # ids, keys, retries
        ("unknown image id", 404, "not_found", lambda c, k: c.get("/v1/images/nope", headers=k.headers)),
        ("unknown patient", 404, "not_found", lambda c, k: c.get("/v1/patients/nobody", headers=k.headers)),
        ("no API key", 401, "unauthorized", lambda c, k: c.get("/v1/patients/nobody")),
        (
            "unknown API key",
            401,
            "unauthorized",
            lambda c, k: c.get("/v1/patients/x", headers={"Authorization": "Bearer drs_wrong"}),
        ),
        (
            "Idempotency-Key reused with another body",
            409,
            "conflict",
            lambda c, k: _reuse(c, k, good),
        ),
        # the test review: the key's length and character rules could go unnoticed
        (
            "Idempotency-Key over 200 characters",
            422,
            "invalid_input",
            lambda c, k: _keyed(c, k, good, "k" * 201),
        ),
        (
            "Idempotency-Key with a control character",
            422,
            "invalid_input",
            lambda c, k: _keyed(c, k, good, "a\tb"),
        ),
    ]
    return cases


def _job(client: TestClient, key: Key, folder: str) -> Any:
    return client.post("/v1/jobs", headers=key.headers, json={"folder": folder})


def _keyed(client: TestClient, key: Key, good: bytes, idempotency_key: str) -> Any:
    return client.post(
        "/v1/images",
        headers=key.headers | {"Idempotency-Key": idempotency_key},
        data={"patient_id": "m-3", "eye": "left"},
        files={"file": ("a", good)},
    )


def _reuse(client: TestClient, key: Key, good: bytes) -> Any:
    headers = key.headers | {"Idempotency-Key": "matrix-1"}
    first = client.post(
        "/v1/images", headers=headers, data={"patient_id": "m-2", "eye": "left"}, files={"file": ("a", good)}
    )
    assert first.status_code == 202
    return client.post(
        "/v1/images", headers=headers, data={"patient_id": "m-2", "eye": "right"}, files={"file": ("a", good)}
    )


def _counts(url: str) -> list[int]:
    with session_scope(url) as s:
        return [
            int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in (Image, Bundle, ScoringJob, Patient)
        ]


def _report(row: dict[str, Any]) -> None:
    target = os.environ.get("DRSCREEN_TEST_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def test_every_bad_input_gets_its_4xx_and_writes_nothing(
    isolated_settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "imports", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    monkeypatch.setenv("DRSCREEN_IMPORT_ROOTS", str(root))
    monkeypatch.setenv("DRSCREEN_MAX_UPLOAD_MB", "1")
    get_settings.cache_clear()
    get_api_settings.cache_clear()
    url = get_settings().database_url
    migrate.upgrade(url)
    key = make_key(url, "Matrix clinic")
    revoked = make_key(url, "Matrix clinic")
    revoke(url, revoked)
    seen: list[tuple[str, int, str]] = []
    with TestClient(create_app()) as client:
        for name, status, error, call in _cases(root, outside):
            before = _counts(url)
            resp = call(client, key)
            body = resp.json()
            seen.append((name, resp.status_code, body.get("error", "")))
            _report({"input": name, "status": resp.status_code, "error": body.get("error")})
            assert (resp.status_code, body.get("error")) == (status, error), (name, resp.text[:300])
            if name != "Idempotency-Key reused with another body":  # its first POST is a good one
                assert _counts(url) == before, name
        resp = client.get("/v1/patients/x", headers=revoked.headers)
        assert resp.status_code == 401
        _report({"input": "revoked API key", "status": resp.status_code, "error": resp.json()["error"]})
    get_api_settings.cache_clear()
    assert len(seen) >= 30
