#!/usr/bin/env bash
# Session 28 experiment (docs/experiments.md, "CBAM on MobileNetV2"), as run: the 8-epoch stage 1 of
# configs/member-mnv2-cbam-multitask-2.3.toml, three head-only natural stages (seeds 36/37/38, 1 thread
# each, side by side), their weight soup, the two candidate ensembles judged on the validation patients
# only (the soup in place of 1.6.0's MobileNetV2, and added as a fourth member), and the draws' check.
#   bash scripts/exp_mnv2_cbam.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=configs/member-mnv2-cbam-multitask-2.3.toml
DIR=runs/s28
C=var/cand28
D=.venv/bin/drscreen
$D train --config $CFG --set two_stage=false --set "out_dir=\"$DIR\""
base=$(ls -d $DIR/*-mobilenetv2_100-256-mnv2-cbam-multitask | sort | head -1)
for seed in 36 37 38; do
  $D train --config $CFG --set threads=1 --set "out_dir=\"$DIR/draws\"" \
    --set "init_from=\"$base/stage1\"" --set stage1.epochs=0 --set seed=$seed | tail -1 > $DIR/draw-$seed &
done
wait
cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38
$D export soup $(cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38) --out $DIR/soup
mkdir -p $C/members
for m in mnv2-regression/1.3.0 lite2-se-multitask/1.3.0 lite1-cbam-multitask/1.8.0; do
  mkdir -p $C/members/$(dirname $m); cp -r models/members/$m $C/members/$m
done
$D export member $DIR/soup --name mnv2-cbam-multitask --version 2.3.0 --models-dir $C
for seed in 36 37 38; do
  $D export member "$(cat $DIR/draw-$seed)" --name mnv2-cbam-d$seed --version 2.3.0 --models-dir $C
done
DRSCREEN_MODELS_DIR=$C $D export ensemble --member mnv2-cbam-multitask@2.3.0 \
  --member lite1-cbam-multitask@1.8.0 --member lite2-se-multitask@1.3.0 --name cand-mnv2-cbam --version 2.3.0 \
  --validation-only --models-dir $C 2>&1 | tail -40
DRSCREEN_MODELS_DIR=$C $D export ensemble --member mnv2-regression@1.3.0 --member mnv2-cbam-multitask@2.3.0 \
  --member lite1-cbam-multitask@1.8.0 --member lite2-se-multitask@1.3.0 --name cand-four-cbam --version 2.3.0 \
  --validation-only --models-dir $C 2>&1 | tail -40
DRSCREEN_MODELS_DIR=$C .venv/bin/python scripts/seed_bag_check.py \
  --draws mnv2-cbam-d36@2.3.0 mnv2-cbam-d37@2.3.0 mnv2-cbam-d38@2.3.0 mnv2-cbam-multitask@2.3.0 \
  --others lite1-cbam-multitask@1.8.0 lite2-se-multitask@1.3.0 2>&1 | tail -30
