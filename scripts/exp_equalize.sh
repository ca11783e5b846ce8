#!/usr/bin/env bash
# Session 21 experiment (docs/experiments.md, "equalize"), as run: the three shipped members'
# recipes retrained with the `equalize` enhancement before Ben Graham's filter, two chains side by
# side at 1 thread each (Lite1+CBAM: stage 1, three head-only draws, their soup; MobileNetV2 then
# Lite2+SE: both stages each), then the candidate ensembles judged on the validation patients only.
# ~70 minutes of 2 cores.
#   bash scripts/exp_equalize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/s21-eq
CAND=var/cand21
D=.venv/bin/drscreen
run_dir() { ls -d "$1"/*-"$2" | sort | tail -1; }

lite1_chain() {
  local cfg=configs/member-lite1-cbam-multitask-eq-2.1.toml
  $D train --config $cfg --set two_stage=false --set "out_dir=\"$DIR/lite1\"" > $DIR/lite1-stage1.log 2>&1
  local base; base=$(run_dir $DIR/lite1 tf_efficientnet_lite1-256-lite1-cbam-multitask)
  for seed in 36 37 38; do
    $D train --config $cfg --set "out_dir=\"$DIR/lite1-draws\"" --set "init_from=\"$base/stage1\"" \
      --set stage1.epochs=0 --set seed=$seed 2> $DIR/lite1-draw-$seed.log | tail -1 > $DIR/draw-$seed
  done
  $D export soup $(cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38) --out $DIR/lite1-soup
}

mnv2_lite2_chain() {
  $D train --config configs/member-mnv2-regression-eq-2.1.toml --set "out_dir=\"$DIR/mnv2\"" \
    > $DIR/mnv2.log 2>&1
  $D train --config configs/member-lite2-se-multitask-eq-2.1.toml --set "out_dir=\"$DIR/lite2\"" \
    > $DIR/lite2.log 2>&1
}

mkdir -p $DIR
if [ "${1:-}" != "--judge-only" ]; then
  lite1_chain &
  mnv2_lite2_chain &
  wait
fi

mkdir -p $CAND/members
for m in mnv2-regression/1.3.0 lite2-se-multitask/1.3.0 lite1-cbam-multitask/1.8.0; do
  mkdir -p $CAND/members/$(dirname $m); cp -r models/members/$m $CAND/members/$m
done
$D export member $DIR/lite1-soup --name lite1-cbam-multitask --version 2.1.0 --models-dir $CAND --force
$D export member "$(run_dir $DIR/mnv2 mobilenetv2_100-256-mnv2-regression)" --name mnv2-regression \
  --version 2.1.0 --models-dir $CAND --force
$D export member "$(run_dir $DIR/lite2 tf_efficientnet_lite2-256-lite2-se-multitask)" \
  --name lite2-se-multitask --version 2.1.0 --models-dir $CAND --force
for lite2 in 1.3.0 2.1.0; do
  DRSCREEN_MODELS_DIR=$CAND $D export ensemble --member mnv2-regression@2.1.0 \
    --member lite1-cbam-multitask@2.1.0 --member lite2-se-multitask@$lite2 --name cand-eq-lite2-$lite2 \
    --version 2.1.0 --validation-only --models-dir $CAND --force 2>&1 | tail -40
done
