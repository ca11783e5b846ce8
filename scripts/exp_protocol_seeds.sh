#!/usr/bin/env bash
# Session 27 experiment (docs/experiments.md, "The protocol's variants over five seeds"): every
# variant of configs/exp/ that changes the model or the preprocessing, at seeds 7-11, two runs side
# by side at 1 thread each (~2 min a run at 128 px, ~8 at 256), then the table of means and
# seed-paired differences to base. ~70 minutes of 2 cores.
#   bash scripts/exp_protocol_seeds.sh            # train every missing run, then the table
#   bash scripts/exp_protocol_seeds.sh --table    # the table only
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/s27
VARIANTS="base attention-se attention-cbam head-ordinal head-regression head-classification pre-clahe pre-none size-256"
SEEDS="7 8 9 10 11"

one_run() {  # variant seed: skipped when its run finished before (the script can be re-started)
  local out="$DIR/$1/s$2"
  if ls "$out"/*/best/metadata.json > /dev/null 2>&1; then return 0; fi
  rm -rf "$out" && mkdir -p "$out"
  .venv/bin/drscreen train --config "configs/exp/$1.toml" --set threads=1 --set "seed=$2" \
    --set "out_dir=\"$out\"" > "$out.log" 2>&1
}
export -f one_run
export DIR

if [ "${1:-}" != "--table" ]; then
  mkdir -p $DIR
  for v in $VARIANTS; do for s in $SEEDS; do echo "$v $s"; done; done \
    | xargs -P 2 -L 1 bash -c 'one_run "$0" "$1"'
fi
.venv/bin/python scripts/exp_seed_summary.py $DIR --base base
