"""Summarise an experiment trained over several seeds: one row per variant.

    python scripts/exp_seed_summary.py runs/s27 --base base

Layout read: DIR/<variant>/s<seed>/<run>/best/metadata.json (what scripts/exp_protocol_seeds.sh
writes). Per variant: mean and standard deviation over seeds of the natural-colour validation QWK
(default cuts, at the epoch early stopping kept) and referable AUC, and the difference to the base
variant paired by seed with its standard error (SD of the differences / sqrt(n)): on 114 validation
photographs one seed's figure moves by more than most variants change it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = {"qwk": "natural_val_qwk_default_thresholds", "auc": "natural_val_referable_auc"}


def load(root: Path) -> dict[str, dict[int, dict[str, float]]]:
    """variant -> seed -> {"qwk": .., "auc": ..} for every finished run under root."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for meta in sorted(root.glob("*/s*/*/best/metadata.json")):
        run = meta.parent.parent
        variant, seed = run.parent.parent.name, int(run.parent.name[1:])
        metrics = json.loads(meta.read_text())["metrics"]
        found.setdefault(variant, {})[seed] = {k: float(metrics[v]) for k, v in METRICS.items()}
    return found


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def paired(variant: dict[int, dict[str, float]], base: dict[int, dict[str, float]], key: str) -> str:
    seeds = sorted(set(variant) & set(base))
    diffs = [variant[s][key] - base[s][key] for s in seeds]
    if len(diffs) < 2:
        return "-"
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{statistics.fmean(diffs):+.3f} (SE {se:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--base", default="base")
    args = parser.parse_args()
    runs = load(args.root)
    base = runs.get(args.base, {})
    print(
        "| variant | seeds | val QWK, mean ± SD | val AUC, mean ± SD "
        "| QWK - base (paired) | AUC - base (paired) |"
    )
    print("|---|---|---|---|---|---|")
    for variant, by_seed in sorted(runs.items(), key=lambda item: (item[0] != args.base, item[0])):
        qwk = [m["qwk"] for m in by_seed.values()]
        auc = [m["auc"] for m in by_seed.values()]
        print(
            f"| {variant} | {len(by_seed)} | {mean_sd(qwk)} | {mean_sd(auc)} | "
            f"{paired(by_seed, base, 'qwk') if variant != args.base else '-'} | "
            f"{paired(by_seed, base, 'auc') if variant != args.base else '-'} |"
        )


if __name__ == "__main__":
    main()
