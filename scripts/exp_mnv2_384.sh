#!/usr/bin/env bash
# Session 29 experiment (docs/experiments.md, "MobileNetV2 at 384 px"), as run: three head-only natural
# stages at 384 px from the shipped mnv2-regression@1.3.0 (seeds 36/37/38, 1 thread each, side by side),
# their weight soup, the two candidate ensembles judged on the validation patients only (the soup added
# to 1.6.0 as a fourth member, and in place of 1.6.0's MobileNetV2), and the draws' check.
#   bash scripts/exp_mnv2_384.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=configs/member-mnv2-regression-384-2.4.toml
DIR=runs/s29
C=var/cand29
D=.venv/bin/drscreen
mkdir -p $DIR
for seed in 36 37 38; do
  $D train --config $CFG --set "out_dir=\"$DIR/draws\"" --set seed=$seed | tail -1 > $DIR/draw-$seed &
done
wait
cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38
$D export soup $(cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38) --out $DIR/soup
mkdir -p $C/members
for m in mnv2-regression/1.3.0 lite2-se-multitask/1.3.0 lite1-cbam-multitask/1.8.0; do
  mkdir -p $C/members/$(dirname $m); cp -r models/members/$m $C/members/$m
done
$D export member $DIR/soup --name mnv2-regression-384 --version 2.4.0 --models-dir $C
for seed in 36 37 38; do
  $D export member "$(cat $DIR/draw-$seed)" --name mnv2-384-d$seed --version 2.4.0 --models-dir $C
done
DRSCREEN_MODELS_DIR=$C $D export ensemble --member mnv2-regression@1.3.0 --member mnv2-regression-384@2.4.0 \
  --member lite1-cbam-multitask@1.8.0 --member lite2-se-multitask@1.3.0 --name cand-four-384 --version 2.4.0 \
  --validation-only --models-dir $C 2>&1 | tail -40
DRSCREEN_MODELS_DIR=$C $D export ensemble --member mnv2-regression-384@2.4.0 \
  --member lite1-cbam-multitask@1.8.0 --member lite2-se-multitask@1.3.0 --name cand-swap-384 --version 2.4.0 \
  --validation-only --models-dir $C 2>&1 | tail -40
DRSCREEN_MODELS_DIR=$C .venv/bin/python scripts/seed_bag_check.py \
  --draws mnv2-384-d36@2.4.0 mnv2-384-d37@2.4.0 mnv2-384-d38@2.4.0 mnv2-regression-384@2.4.0 \
  --others mnv2-regression@1.3.0 lite1-cbam-multitask@1.8.0 lite2-se-multitask@1.3.0 2>&1 | tail -30
