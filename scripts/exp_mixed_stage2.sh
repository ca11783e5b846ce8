#!/usr/bin/env bash
# Session 6 experiment: does mixing equalised photographs into the natural stage help?
# (rule fixed before the runs: docs/experiments.md, "Session 6")
# For each seed: the MobileNetV2 member's config (stage 1 + plain natural stage, as released),
# then two natural stages from that run's stage-1 checkpoint: plain (P) and with half of each
# epoch from the equalised training photographs (M, stage2.mix_equalized = 0.5).
#   scripts/exp_mixed_stage2.sh            # ~45 min on 2 cores (the two seeds side by side)
#   scripts/exp_mixed_stage2.sh --report   # the table, from the runs
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/member-mnv2-regression.toml
out=runs/s6-mix
seeds=(22 222)

report() {
  .venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for meta in sorted(out.glob("*/best/metadata.json")):
    m = json.loads(meta.read_text())
    cfg = m["train_config"]
    arm = "full run" if cfg["stage1"]["epochs"] else ("M" if cfg["stage2"].get("mix_equalized", 0) else "P")
    rows[(cfg["seed"], arm)] = m["metrics"]
print("| seed | arm | natural-val QWK (default cuts) | natural-val referable AUC |")
print("|---|---|---|---|")
for (seed, arm), m in sorted(rows.items()):
    print(f"| {seed} | {arm} | {m['natural_val_qwk_default_thresholds']:.3f} | {m['natural_val_referable_auc']:.3f} |")
for arm in ("P", "M"):
    got = [m for (s, a), m in rows.items() if a == arm]
    if got:
        q = sum(m["natural_val_qwk_default_thresholds"] for m in got) / len(got)
        a = sum(m["natural_val_referable_auc"] for m in got) / len(got)
        print(f"mean {arm} over {len(got)} seed(s): QWK {q:.3f}, AUC {a:.3f}")
PY
}
if [[ "${1:-}" == "--report" ]]; then report; exit 0; fi

.venv/bin/python -c "from pathlib import Path; from ml.training.config import load_config; \
from ml.training.train import prepare_data; prepare_data(load_config('$config'), Path.cwd())"
mkdir -p var
for seed in "${seeds[@]}"; do
  (
    set -euo pipefail
    run=$(.venv/bin/drscreen train --config "$config" --set threads=1 --set "seed=$seed" \
            --set "name=\"mnv2-regression-s$seed\"" --set "out_dir=\"$out\"" | tail -1)
    for mix in 0.0 0.5; do
      .venv/bin/drscreen train --config "$config" --set threads=1 --set "seed=$seed" \
        --set "name=\"mnv2-regression-s$seed\"" --set "out_dir=\"$out\"" --set "init_from=\"$run/stage1\"" --set stage1.epochs=0 \
        --set "stage2.mix_equalized=$mix" | tail -1
    done
  ) > "var/s6-mix-seed$seed.log" 2>&1 &
done
wait
report
