"""Peak memory of decoding hostile-but-valid uploads: small files that decode to huge images.

    python scripts/decode_memory.py [--side 7070] [--dir /tmp/decode-memory]

Writes a 16-bit PNG, an RGBA PNG, a greyscale PNG, an RGB PNG, a 16-bit TIFF, and 16-bit RGB PNG
and TIFF files holding 12-bit data (whose full samples OpenCV reads, session 32) of side x side
pixels (just under the default 50-megapixel cap at 7070), then decodes each in a fresh process
twice: as a worker does (``ml.imageio.decode_image``: RGB pixels) and as the API does
(``ml.imageio.check_image``: validation only). Prints the peak resident memory (VmHWM) above
the process's peak after imports (docs/reliability.md, session 17).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# VmHWM, not ru_maxrss: the latter survives exec, so the child would start at its parent's peak.
_CHILD = """
import sys
from ml.imageio import check_image, decode_image
def hwm_kb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1])
data = open(sys.argv[2], "rb").read()
base = hwm_kb()
(check_image if sys.argv[1] == "check" else decode_image)(data, 50_000_000)
print((hwm_kb() - base) // 1024)
"""


def make_files(folder: Path, side: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "16bit.png": Image.new("I;16", (side, side)),
        "rgba.png": Image.new("RGBA", (side, side), (10, 20, 30, 128)),
        "grey.png": Image.new("L", (side, side)),
        "rgb.png": Image.new("RGB", (side, side)),
        "16bit.tif": Image.new("I;16", (side, side)),
    }
    paths = []
    for name, img in made.items():
        path = folder / name
        img.save(path, compression="tiff_lzw") if name.endswith(".tif") else img.save(path)
        paths.append(path)
    paths += _twelve_bit_rgb(folder, side)
    return paths


def _twelve_bit_rgb(folder: Path, side: int) -> list[Path]:
    """16-bit RGB files whose samples are 12-bit data (Pillow cannot write 16-bit RGB)."""
    import cv2
    import numpy as np

    values = np.zeros((side, side, 3), dtype=np.uint16)
    values[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (3000, 1500, 600)
    paths = []
    for name, params in (("12bit-rgb.png", []), ("12bit-rgb.tif", [cv2.IMWRITE_TIFF_COMPRESSION, 5])):
        path = folder / name
        ok, buf = cv2.imencode(path.suffix, values, params)
        if not ok:
            raise SystemExit(f"OpenCV could not write {name}")
        path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def peak_mb(mode: str, path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=7070)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/decode-memory"))
    args = parser.parse_args()
    print(f"{'file':<14} {'bytes':>9} {'worker decode MB':>17} {'API check MB':>13}")
    for path in make_files(args.dir, args.side):
        decode, check = peak_mb("decode", path), peak_mb("check", path)
        print(f"{path.name:<14} {path.stat().st_size:>9} {decode:>17} {check:>13}")


if __name__ == "__main__":
    main()
