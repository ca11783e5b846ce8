"""How much JPEG damage the decoder's checks refuse, and how visible the rest is (docs/reliability.md,
session 23). Copies of natural-colour photographs get 1-64 random bytes overwritten at a random place
inside their scan data; each copy is decoded by ``ml.imageio.check_image`` (Pillow plus libjpeg-turbo
in strict mode) and, when accepted, compared with the intact photograph's decode.

    python scripts/jpeg_damage_check.py [--photos 200] [--copies 4] [--seed 12345]

Prints the counts: refused, and accepted split by the share of pixels that changed by more than 10
grey levels (under 1%: hardly visible; 1-5%: slightly; over 5%: visibly damaged) and by the quality
gate's verdict as a worker gives it (``ml.quality.assess_quality``, then ``ml.jpeg_damage``'s check
for shifted blocks: an ungradable photograph is referred, not graded).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.imageio import ImageDecodeError, check_image, decode_image
from ml.quality import assess_quality
from workers.scoring import with_damage_check

NATURAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eyepacs-natural-512" / "images"


def scan_data(jpeg: bytes) -> tuple[int, int]:
    """(first byte, end) of the entropy-coded data after the first SOS segment's header."""
    at = 2
    while at < len(jpeg):
        marker, length = jpeg[at + 1], int.from_bytes(jpeg[at + 2 : at + 4], "big")
        if marker == 0xDA:
            return at + 2 + length, jpeg.rindex(b"\xff\xd9")
        at += 2 + length
    raise ValueError("no SOS segment")


def damaged(jpeg: bytes, rng: random.Random) -> bytes:
    start, end = scan_data(jpeg)
    n = rng.randint(1, 64)
    at = rng.randint(start, end - n)
    copy = bytearray(jpeg)
    copy[at : at + n] = bytes(rng.randint(0, 255) for _ in range(n))
    return bytes(copy)


def verdict(original: np.ndarray, data: bytes) -> str:
    try:
        check_image(data)
    except ImageDecodeError:
        return "refused"
    rgb = decode_image(data)
    changed = float((np.abs(rgb.astype(np.int16) - original).max(axis=2) > 10).mean())
    gate = "gradable" if with_damage_check(assess_quality(rgb), data).gradable else "ungradable"
    if changed < 0.01:
        return f"accepted, hardly visible (<1% of pixels changed), {gate}"
    seen = "slightly damaged (1-5%)" if changed <= 0.05 else "visibly damaged (>5%)"
    return f"accepted, {seen}, {gate}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    for path in rng.sample(sorted(NATURAL.glob("*.jpg")), args.photos):
        jpeg = path.read_bytes()
        original = decode_image(jpeg).astype(np.int16)
        for _ in range(args.copies):
            counts[verdict(original, damaged(jpeg, rng))] += 1
    total = sum(counts.values())
    for name, n in sorted(counts.items()):
        print(f"{name}: {n} of {total}")


if __name__ == "__main__":
    main()
