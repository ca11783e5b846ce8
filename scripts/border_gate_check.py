"""Does judging a fundus inside a black border (session 32) change anything it should not?

    python scripts/border_gate_check.py [--data ../shared/data] [--border-equalised 600] [--grades 8]

1. Every real photograph (all natural-colour and equalised EyePACS ones and the 40 DRIVE ones in
   the data folder, and the shipped samples): the gate's verdict on the whole frame as before
   (``ml.quality.assess_frame``) against today's (``assess_quality``): changed gradable verdicts
   and changed reasons, per set; and the networks' crop box before (``ml.preprocess.frame_disc_bbox``)
   against today's (``disc_bbox``): photographs whose crop changed, gradable ones apart.
2. Bordered copies (each photograph pasted, unresampled, on a black square canvas 1.3x, 2x, 3.1x
   and 5x its longer side, centred and off-centre) of the natural, DRIVE and sample photographs and
   ``--border-equalised`` equalised ones: verdicts that differ from the plain photograph's, by
   the old gate and by today's; and whether the model's crop (``ml.preprocess.crop_square``) of
   the bordered copy equals the plain photograph's.
3. With ``--grades N``: the released ensemble's grade and expected grade of N gradable natural
   photographs, plain and on 1.3x, 3.1x and 5x canvases.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ml.imageio import decode_image
from ml.preprocess import crop_square, disc_bbox, frame_disc_bbox
from ml.quality import assess_frame, assess_quality

REPO = Path(__file__).resolve().parents[1]
CANVASES = (1.3, 2.0, 3.1, 5.0)
PLACES = ((0.5, 0.5), (0.2, 0.7))  # (down, across) share of the free room above/left of the photograph


def on_canvas(rgb: np.ndarray, factor: float, place: tuple[float, float]) -> np.ndarray:
    """``rgb`` pasted on a black square canvas ``factor`` times its longer side."""
    h, w = rgb.shape[:2]
    side = round(max(h, w) * factor)
    out = np.zeros((side, side, 3), np.uint8)
    top, left = round((side - h) * place[0]), round((side - w) * place[1])
    out[top : top + h, left : left + w] = rgb
    return out


def photo_sets(data: Path) -> dict[str, list[Path]]:
    sets = {
        name: sorted(p for p in (data / name / "images").rglob("*") if p.is_file())
        for name in ("eyepacs-natural-512", "eyepacs-equalized-256", "drive-ungraded")
    }
    sets["samples"] = sorted((REPO / "samples").glob("*/*.jp*g"))
    missing = [name for name, files in sets.items() if not files]
    if missing:
        raise SystemExit(f"no photographs found for {missing} under {data}")
    return sets


def real_verdicts(sets: dict[str, list[Path]]) -> None:
    print("1. real photographs: whole-frame gate (before) vs today's")
    for name, files in sets.items():
        changed = reasons = gradable = crops = gradable_crops = 0
        for path in files:
            rgb = decode_image(path.read_bytes())
            before, now = assess_frame(rgb), assess_quality(rgb)
            changed += before.gradable != now.gradable
            reasons += before.reasons != now.reasons
            gradable += now.gradable
            moved = disc_bbox(rgb) != frame_disc_bbox(rgb)
            crops += moved
            gradable_crops += moved and now.gradable
        counts = (
            f"gradable {gradable:>5}  changed verdicts {changed}  changed reasons {reasons}"
            f"  changed crops {crops} (gradable {gradable_crops})"
        )
        print(f"   {name:<24} n={len(files):>5}  {counts}", flush=True)


def bordered(sets: dict[str, list[Path]], equalised: int) -> None:
    print("2. bordered copies: verdicts that differ from the plain photograph's; model crops")
    picked = dict(sets)
    eq = list(sets["eyepacs-equalized-256"])
    random.Random(0).shuffle(eq)
    picked["eyepacs-equalized-256"] = sorted(eq[:equalised])
    for name, files in picked.items():
        old = Counter[float]()
        new = Counter[float]()
        crops_equal = copies = 0
        examples: list[str] = []
        for path in files:
            rgb = decode_image(path.read_bytes())
            plain = assess_quality(rgb).gradable
            plain_crop = crop_square(rgb, True)
            for factor in CANVASES:
                for place in PLACES:
                    copy = on_canvas(rgb, factor, place)
                    copies += 1
                    old[factor] += assess_frame(copy).gradable != plain
                    verdict = assess_quality(copy)
                    if verdict.gradable != plain:
                        new[factor] += 1
                        if len(examples) < 3:
                            examples.append(f"{path.name} x{factor}: {verdict.reasons or 'gradable'}")
                    crops_equal += np.array_equal(crop_square(copy, True), plain_crop)
        per = "  ".join(f"x{f}: before {old[f]}, now {new[f]}" for f in CANVASES)
        print(f"   {name:<24} photographs {len(files):>4} (x{len(PLACES)} places)  {per}")
        print(
            f"   {'':<24} model crop equal to the plain one's: {crops_equal}/{copies}  {'; '.join(examples)}"
        )


def gradable_naturals(files: list[Path], n: int) -> Iterator[tuple[Path, np.ndarray]]:
    found = 0
    for path in files:
        rgb = decode_image(path.read_bytes())
        if found < n and assess_quality(rgb).gradable:
            found += 1
            yield path, rgb


def grades(sets: dict[str, list[Path]], n: int) -> None:
    from ml.inference import load_ensemble

    ens = load_ensemble(threads=1)
    factors = (1.3, 3.1, 5.0)
    print(f"3. {ens.ref}: grade (expected grade) plain, then on canvases {factors}")
    step = max(1, len(sets["eyepacs-natural-512"]) // (4 * n))
    differ = 0
    for path, rgb in gradable_naturals(sets["eyepacs-natural-512"][::step], n):
        copies = [on_canvas(rgb, f, PLACES[1]) for f in factors]
        gradable = [assess_quality(c).gradable for c in copies]
        plain, *bordered = ens.predict([rgb, *copies])
        differ += sum(b.probabilities != plain.probabilities for b in bordered)
        shown = "  ".join(
            f"{b.grade} ({b.score:.4f}){'' if ok else ' ungradable'}"
            for b, ok in zip(bordered, gradable, strict=True)
        )
        print(f"   {path.name:<18} {plain.grade} ({plain.score:.4f})  {shown}", flush=True)
    print(f"   bordered copies whose probabilities differ from the plain photograph's: {differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--border-equalised", type=int, default=600, help="equalised photographs to border")
    parser.add_argument(
        "--grades", type=int, default=0, help="grade this many photographs plain and bordered"
    )
    args = parser.parse_args()
    sets = photo_sets(args.data)
    real_verdicts(sets)
    bordered(sets, args.border_equalised)
    if args.grades:
        grades(sets, args.grades)


if __name__ == "__main__":
    main()
