"""Decoder edge cases, all on synthetic images built in memory."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.imageio import ImageDecodeError, check_image, decode_image, decode_scaled, sniff_format


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 120, h: int = 80) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, axis=0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 90)], axis=2))


def _reason(data: bytes, **kw: int) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, **kw)
    assert isinstance(ei.value, ValueError)
    return ei.value.reason


def test_jpeg_png_tiff_roundtrip() -> None:
    for fmt in ("JPEG", "PNG", "TIFF"):
        arr = decode_image(_encode(_gradient(), fmt))
        assert arr.shape == (80, 120, 3) and arr.dtype == np.uint8
        assert arr.flags["C_CONTIGUOUS"]


def test_sniff_format() -> None:
    assert sniff_format(_encode(_gradient(), "JPEG")) == "jpeg"
    assert sniff_format(_encode(_gradient(), "PNG")) == "png"
    assert sniff_format(_encode(_gradient(), "TIFF")) == "tiff"
    assert sniff_format(_encode(_gradient(), "GIF")) == "gif"
    assert sniff_format(b"hello world") is None
    assert sniff_format(b"") is None


def test_empty_and_text_and_gif() -> None:
    assert _reason(b"") == "empty"
    assert _reason(b"patient,eye,grade\n1,left,0\n") == "not_an_image"
    assert _reason(_encode(_gradient(), "GIF")) == "unsupported_format"


def test_truncated_jpeg_is_rejected() -> None:
    data = _encode(_gradient(200, 200), "JPEG")
    assert _reason(data[: len(data) // 2]) == "truncated"
    assert _reason(data[:-2]) == "truncated"  # only the EOI marker missing
    # Zero padding after EOI (some cameras) is fine.
    assert decode_image(data + b"\x00" * 16).shape == (200, 200, 3)


def test_corrupt_jpeg_body_with_valid_ends() -> None:
    data = bytearray(_encode(_gradient(200, 200), "JPEG"))
    sos = data.find(b"\xff\xda")
    data[sos + 2 : len(data) - 2] = b"\xff" * (len(data) - 4 - sos)  # garbage entropy data
    assert _reason(bytes(data)) in {"corrupt", "truncated"}


def test_png_without_iend() -> None:
    data = _encode(_gradient(), "PNG")
    assert data.endswith(b"IEND\xaeB`\x82")
    assert _reason(data[:-12]) == "truncated"
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_grayscale_rgba_cmyk() -> None:
    gray = decode_image(_encode(_gradient().convert("L"), "PNG"))
    assert gray.shape == (80, 120, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba = Image.new("RGBA", (100, 100), (200, 50, 10, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 50, 100))
    arr = decode_image(_encode(rgba, "PNG"))
    assert tuple(arr[50, 75]) == (200, 50, 10) and tuple(arr[50, 10]) == (0, 0, 0)
    cmyk = decode_image(_encode(Image.new("CMYK", (100, 100), (0, 255, 255, 0)), "JPEG"))
    assert cmyk[50, 50, 0] > 200 and cmyk[50, 50, 1] < 60


def test_16bit_png_scaled_not_clipped() -> None:
    ramp = (np.linspace(0, 65535, 256)[None, :].repeat(70, axis=0)).astype(np.uint16)
    arr = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert arr.dtype == np.uint8 and arr.shape == (70, 256, 3)
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert abs(int(arr[0, 128, 0]) - 128) <= 2  # linear scaling, not truncation to 255


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red square top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    arr = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert arr.shape == (120, 80, 3)
    assert arr[5, -5, 0] > 200 and arr[5, -5, 2] < 60  # red now top-right


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding() -> None:
    assert _reason(_png_header_only(100_000, 100_000)) == "too_large"
    assert _reason(_encode(_gradient(300, 300), "PNG"), max_pixels=50_000) == "too_large"


def test_too_small() -> None:
    assert _reason(_encode(_gradient(63, 200), "PNG")) == "too_small"
    assert decode_image(_encode(_gradient(64, 64), "PNG")).shape == (64, 64, 3)


def test_signature_mismatch_is_corrupt() -> None:
    assert _reason(b"\xff\xd8\xff" + b"\x00" * 100 + b"\xff\xd9") == "corrupt"
    assert _reason(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND\xaeB`\x82") == "corrupt"


def test_imageio_does_not_import_heavy_or_service_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ml.imageio, ml.quality; "
        "bad=[m for m in ('torch','core','services','workers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_big_jpeg_decodes_at_a_reduced_scale_with_its_full_size() -> None:
    img = _gradient(2400, 2100)
    data = _encode(img, "JPEG", quality=92)
    small, full = decode_scaled(data, min_side=512)
    assert full == (2100, 2400)
    assert small.shape == (525, 600, 3)  # 1/4 keeps the shorter side >= 512, 1/8 would not
    reference = np.asarray(Image.fromarray(decode_image(data)).resize((600, 525), Image.BOX))
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 2.0
    # PNG and JPEGs under twice min_side decode in full
    assert decode_scaled(_encode(img, "PNG"), min_side=512)[0].shape == (2100, 2400, 3)
    assert decode_scaled(data, min_side=1200)[0].shape == (2100, 2400, 3)


def test_reduced_scale_keeps_orientation_and_rejects_truncation() -> None:
    img = Image.new("RGB", (2400, 1600), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 400, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    small, full = decode_scaled(data, min_side=256)
    assert full == (2400, 1600)
    assert small.shape[0] > small.shape[1] and min(small.shape[:2]) >= 256
    assert small[10, -10, 0] > 200 and small[10, -10, 2] < 60  # red top-right, as in full decode
    with pytest.raises(ImageDecodeError) as ei:
        decode_scaled(data[: len(data) // 2], min_side=256)
    assert ei.value.reason == "truncated"


def test_api_validation_keeps_the_full_size_of_a_big_jpeg() -> None:
    """services.uploads decodes big JPEGs at a reduced scale to validate them; the recorded
    size is still the photograph's own, and a truncated one is still refused."""
    from fastapi import UploadFile

    from services.uploads import InvalidImage, validate_photo

    data = _encode(_gradient(3000, 2000), "JPEG", quality=90)
    photo = validate_photo(
        UploadFile(io.BytesIO(data), filename="big.jpg"), "file", max_bytes=1 << 26, max_pixels=40_000_000
    )
    assert (photo.width, photo.height) == (3000, 2000) and photo.data == data
    with pytest.raises(InvalidImage):
        validate_photo(
            UploadFile(io.BytesIO(data[: len(data) // 2]), filename="big.jpg"),
            "file",
            max_bytes=1 << 26,
            max_pixels=40_000_000,
        )


SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "16" / "16_left.jpg"


@pytest.mark.parametrize("kept", [0.3, 0.5, 0.9])
def test_jpeg_cut_short_and_closed_with_ffd9_is_truncated(kept: float) -> None:
    """A transfer that stopped part-way and a tool that closed the file with an EOI marker: libjpeg
    decodes it with its lower part flat grey, and that photograph must not be graded."""
    data = SAMPLE.read_bytes()
    cut = data[: int(len(data) * kept)] + b"\xff\xd9"
    for decode in (decode_image, lambda d: decode_scaled(d, min_side=128)[0]):
        with pytest.raises(ImageDecodeError) as ei:
            decode(cut)
        assert ei.value.reason == "truncated"
    # the big-photograph path (decoded at a reduced DCT scale) fills the same grey
    big = _encode(Image.open(io.BytesIO(data)).resize((2048, 1368)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError) as ei:
        decode_scaled(big[: int(len(big) * kept)] + b"\xff\xd9", min_side=256)
    assert ei.value.reason == "truncated"


def test_grey_pictures_and_whole_photographs_are_not_called_truncated() -> None:
    assert decode_image(SAMPLE.read_bytes()).shape == (342, 512, 3)
    grey = _encode(Image.new("RGB", (200, 120), (128, 128, 128)), "JPEG")
    assert (decode_image(grey) == 128).all()  # for the quality gate to judge, not the decoder
    # a photograph whose last row is grey but not the decoder's flat 128 fill
    img = np.asarray(_gradient(200, 120)).copy()
    img[-8:] = 127
    assert decode_image(_encode(Image.fromarray(img), "PNG")).shape == (120, 200, 3)
    img[-8:] = 128  # a PNG holds what was written: only JPEG data ends in libjpeg's fill
    assert decode_image(_encode(Image.fromarray(img), "PNG")).shape == (120, 200, 3)


@pytest.mark.parametrize(("where", "fill"), [(0.2, b"\x00" * 16), (0.5, b"\x55" * 16), (0.7, b"\xaa" * 8)])
def test_damaged_entropy_data_that_pillow_decodes_is_corrupt(where: float, fill: bytes) -> None:
    """The walkthrough: bytes overwritten inside a JPEG's scan decode without an error (libjpeg warns,
    Pillow drops the warning) and the photograph was graded. libjpeg-turbo's strict mode refuses it."""
    data = SAMPLE.read_bytes()
    scan = data.find(b"\xff\xda")
    at = scan + int((len(data) - scan) * where)
    damaged = data[:at] + fill + data[at + len(fill) :]
    Image.open(io.BytesIO(damaged)).load()  # Pillow alone takes it
    for decode in (decode_image, lambda d: decode_scaled(d, min_side=128)[0], check_image):
        with pytest.raises(ImageDecodeError) as ei:
            decode(damaged)
        assert ei.value.reason == "corrupt" and "damaged" in str(ei.value)


@pytest.mark.parametrize("where", [0.2, 0.8])
@pytest.mark.parametrize("fill", [b"\x00" * 3, b"\x55" * 3])
def test_damage_before_a_restart_marker_is_corrupt_not_padding(where: float, fill: bytes) -> None:
    """libjpeg says "N extraneous bytes before marker 0xd0-0xd7" when a scan with restart markers
    is damaged: that is damage, not the encoder padding accepted before the end marker (the test
    review: without the rule such photographs were graded)."""
    data = _encode(Image.open(SAMPLE).convert("RGB"), "JPEG", quality=90, restart_marker_blocks=4)
    scan = data.find(b"\xff\xda")
    at = scan + int((len(data) - scan) * where)
    damaged = data[:at] + fill + data[at + len(fill) :]
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(damaged)
    assert ei.value.reason == "corrupt" and "extraneous bytes before marker 0xd" in str(ei.value)


def test_the_strict_check_passes_every_shipped_sample_and_other_encodings() -> None:
    for photo in sorted(SAMPLE.parents[1].glob("*/*.jpg")):
        assert check_image(photo.read_bytes())[0] > 0, photo
    rgb = Image.open(SAMPLE).convert("RGB")
    for kw in ({"progressive": True}, {"subsampling": 0}, {"subsampling": 1}, {"quality": 40}):
        assert decode_image(_encode(rgb, "JPEG", **kw)).shape == (342, 512, 3), kw
    assert decode_image(_encode(rgb.convert("L"), "JPEG")).shape == (342, 512, 3)
    assert decode_image(_encode(rgb.convert("CMYK"), "JPEG")).shape == (342, 512, 3)


def test_padding_libjpeg_warns_about_is_not_damage() -> None:
    """The review: stray bytes before the end marker or between header segments made libjpeg warn
    ("N extraneous bytes before marker") and whole photographs were refused as damaged; graded
    before, they would have failed on the next release's re-grade."""
    data = SAMPLE.read_bytes()
    header_end = data.find(b"\xff\xdb")
    padded = {
        "one byte before EOI (a known encoder quirk)": data[:-2] + b"\x5a" + data[-2:],
        "a run of zeros before EOI": data[:-2] + b"\x00" * 8 + data[-2:],
        "a byte between header segments": data[:header_end] + b"\x00" + data[header_end:],
    }
    whole = decode_image(data)
    for name, photo in padded.items():
        assert (decode_image(photo) == whole).all(), name


def test_padding_is_judged_on_the_scan_not_on_an_appended_picture() -> None:
    """The review: the end marker was the file's last one, so a copy of the photograph appended (as
    multi-picture files carry a preview) made benign padding look damaged; 0xFF fill bytes before
    the end marker hid real stray bytes."""
    data = SAMPLE.read_bytes()
    padded = data[:-2] + b"\x00" * 8 + data[-2:]
    assert decode_image(padded + data).shape == (342, 512, 3)
    # 4 bytes overwritten in the scan: libjpeg finds 4 varied stray bytes before the end marker
    damaged = data[:5024] + bytes.fromhex("e05d1809") + data[5028:]
    for photo in (damaged, damaged[:-2] + b"\xff" * 4 + damaged[-2:], damaged + data):
        with pytest.raises(ImageDecodeError):
            decode_image(photo)


@pytest.mark.parametrize(("mode", "fmt"), [("P", "PNG"), ("P", "BMP"), ("P", "TIFF"), ("1", "PNG")])
def test_palette_images_are_refused_with_a_reason(mode: str, fmt: str) -> None:
    """The session-31 review: a palette PNG (colours reduced to 256) was graded, every quality
    check passed, and two of 15 referable photographs graded 0. Refused, at the API's check too."""
    data = _encode(_gradient().convert(mode), fmt)
    for check in (decode_image, check_image):
        with pytest.raises(ImageDecodeError) as info:
            check(data)
        assert info.value.reason == "unsupported_format" and "palette" in info.value.detail


@pytest.mark.parametrize("brand", [b"heic", b"mif1", b"avif"])
def test_heic_and_avif_are_named_and_refused_with_what_to_do(brand: bytes) -> None:
    data = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    assert sniff_format(data) == "heif"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == "unsupported_format" and "JPEG" in info.value.detail


def test_a_folder_jobs_heic_file_is_refused_with_the_same_advice(tmp_path: Path) -> None:
    """The final read of session 31: folder jobs said "heif images are not accepted" only."""
    from workers.folders import _not_a_photo

    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    why = _not_a_photo(photo, None)
    assert why is not None and why.startswith("unsupported_format: ") and "JPEG" in why


def test_the_commit_is_not_recorded_from_another_projects_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The final read of session 31: ``code_commit`` ignored git's exit status and would have
    recorded the commit of a project the package is installed in."""
    import subprocess

    from ml.release import code_commit

    class Done:
        def __init__(self, returncode: int, stdout: str) -> None:
            self.returncode, self.stdout = returncode, stdout

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done(0, "/somewhere/else\n"))
    assert code_commit() is None
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done(128, ""))
    assert code_commit() is None
