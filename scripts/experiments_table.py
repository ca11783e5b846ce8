"""Collect experiment runs (runs/*-exp-*) and the release's ensemble card into docs/experiments.md.

    python scripts/experiments_table.py [--ensemble NAME@VERSION]

Each row: the variant, what it changes, natural-colour validation QWK (default thresholds
0.5/1.5/2.5/3.5, so no row is tuned on the figures it reports), referable AUC, and the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def latest_runs() -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for run in sorted((ROOT / "runs").glob("*-exp-*")):
        if (run / "best" / "metadata.json").exists():
            runs[run.name.split("-exp-", 1)[1]] = run  # later runs of a variant win
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ensemble", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments.md")
    args = parser.parse_args()
    lines = [
        "# Experiments",
        "",
        "Protocol (`configs/exp/base.toml`): EfficientNet-Lite0 at 128 px, stage 1 = 3 short epochs",
        "(1 frozen) of 1,500 class-balanced equalised photographs, stage 2 = up to 5 epochs on the",
        "natural-colour training patients, early stopping on natural-colour validation QWK. Every variant",
        "changes one thing. Same patient split as the release (split hash in each run's metadata).",
        "Figures: natural-colour validation patients (114 photographs), default thresholds.",
        "",
        "| variant | natural val QWK | natural val referable AUC | stage-1-only val QWK | command |",
        "|---|---|---|---|---|",
    ]
    for name, run in latest_runs().items():
        best = json.loads((run / "best" / "metadata.json").read_text())["metrics"]
        s1_path = run / "stage1" / "metadata.json"
        s1 = json.loads(s1_path.read_text())["metrics"] if s1_path.exists() else {}
        cfg = f"configs/exp/{name}.toml" if name != "base" else "configs/exp/base.toml"
        auc = best.get("natural_val_referable_auc")
        lines.append(
            f"| {name} | {best['natural_val_qwk_default_thresholds']:.3f} | "
            f"{'-' if auc is None else f'{auc:.3f}'} | "
            f"{s1.get('natural_val_qwk_default_thresholds', float('nan')):.3f} | "
            f"`drscreen train --config {cfg}` |"
        )
    members = sorted(p for p in (ROOT / "runs").glob("*") if "-exp-" not in p.name and "smoke" not in p.name)
    members = [
        p
        for p in members
        if (p / "stage1" / "metadata.json").exists() and (p / "best" / "metadata.json").exists()
    ]
    if members:
        lines += [
            "",
            "## One stage vs two stages, on the released members (256 px)",
            "",
            "Stage 1 only = the member after the equalised set;",
            "two stages = after natural-colour fine-tuning.",
            "Natural-colour validation QWK, default thresholds.",
            "",
            "| run | stage 1 only | two stages | command |",
            "|---|---|---|---|",
        ]
        for run in members:
            s1 = json.loads((run / "stage1" / "metadata.json").read_text())["metrics"]
            s2 = json.loads((run / "best" / "metadata.json").read_text())["metrics"]
            name = run.name.split("-256-", 1)[-1]
            lines.append(
                f"| {run.name} | {s1['natural_val_qwk_default_thresholds']:.3f} | "
                f"{s2['natural_val_qwk_default_thresholds']:.3f} | "
                f"`drscreen train --config configs/member-{name}.toml` |"
            )
    if args.ensemble:
        name, version = args.ensemble.split("@")
        manifest = json.loads((ROOT / "models" / "ensembles" / name / version / "manifest.json").read_text())
        lines += [
            "",
            f"## Members and combination rules of {args.ensemble}",
            "",
            "Thresholds/weights fitted on natural-colour validation; test = natural-colour patients",
            "no member was trained or tuned on. Reproduce: `scripts/release.sh 1.0.0`.",
            "",
            "| member or rule | val QWK | test QWK | test referable AUC "
            "| test referable sens. | test referable spec. |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in manifest["card"]["metrics"].items():
            v, t = row["validation"], row["test"]
            lines.append(
                f"| {key} | {v['qwk']:.3f} | {t['qwk']:.3f} | {t['referable_auc']:.3f} | "
                f"{t['referable_sensitivity']:.3f} | {t['referable_specificity']:.3f} |"
            )
    findings = ROOT / "docs" / "experiments-findings.md"  # hand-written conclusions, kept on rerun
    if findings.exists():
        lines += ["", findings.read_text().rstrip()]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
