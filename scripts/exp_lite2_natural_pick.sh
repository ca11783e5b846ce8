#!/usr/bin/env bash
# Session 21, second experiment (docs/experiments.md), as run: Lite2+SE with the 1.8 recipe (stage-1
# epoch kept by natural-colour AUC, three head-only draws, their soup), once with the shipped
# preprocessing and once with `equalize`, side by side at 1 thread each; then 1.6.0 with each soup in
# place of its Lite2+SE, judged on the validation patients only. ~50 minutes on 2 cores.
#   bash scripts/exp_lite2_natural_pick.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/s21-lite2
CAND=var/cand21b
D=.venv/bin/drscreen

chain() {  # chain VARIANT: stage 1, three head-only draws, soup
  local cfg=configs/member-lite2-se-multitask-$1-2.2.toml out=$DIR/$1 base seed
  mkdir -p $out
  base=$($D train --config $cfg --set two_stage=false --set "out_dir=\"$out\"" 2> $out/stage1.log | tail -1)
  for seed in 36 37 38; do
    $D train --config $cfg --set "out_dir=\"$out/draws\"" --set "init_from=\"$base/stage1\"" \
      --set stage1.epochs=0 --set seed=$seed 2> $out/draw-$seed.log | tail -1 > $out/draw-$seed
  done
  $D export soup $(cat $out/draw-36 $out/draw-37 $out/draw-38) --out $out/soup
}

if [ "${1:-}" != "--judge-only" ]; then
  chain plain &
  chain eq &
  wait
fi
mkdir -p $CAND/members
for m in mnv2-regression/1.3.0 lite1-cbam-multitask/1.8.0; do
  mkdir -p $CAND/members/$(dirname $m); cp -r models/members/$m $CAND/members/$m
done
$D export member $DIR/plain/soup --name lite2-se-multitask --version 2.2.0 --models-dir $CAND --force
$D export member $DIR/eq/soup --name lite2-se-multitask --version 2.2.1 --models-dir $CAND --force
for lite2 in 2.2.0 2.2.1; do
  DRSCREEN_MODELS_DIR=$CAND $D export ensemble --member mnv2-regression@1.3.0 \
    --member lite1-cbam-multitask@1.8.0 --member lite2-se-multitask@$lite2 --name cand-lite2-$lite2 \
    --version 2.2.0 --validation-only --models-dir $CAND --force 2>&1 | grep -v scoring | tail -5
done
