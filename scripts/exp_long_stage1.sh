#!/usr/bin/env bash
# Session 20 experiment (docs/experiments.md, "a stage 1 three and a half times longer"), as run:
# the 28-epoch stage 1 of configs/member-lite1-cbam-multitask-2.0.toml, three head-only natural
# stages (seeds 36/37/38, 1 thread each, side by side), their weight soup, the candidate ensemble
# judged on the validation patients only, and the draws' information check. ~2 hours on 2 cores.
#   bash scripts/exp_long_stage1.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=configs/member-lite1-cbam-multitask-2.0.toml
DIR=runs/s20
.venv/bin/drscreen train --config $CFG --set two_stage=false --set "out_dir=\"$DIR\""
base=$(ls -d $DIR/*-tf_efficientnet_lite1-256-lite1-cbam-multitask | sort | head -1)
for seed in 36 37 38; do
  .venv/bin/drscreen train --config $CFG --set threads=1 --set "out_dir=\"$DIR/draws\"" \
    --set "init_from=\"$base/stage1\"" --set stage1.epochs=0 --set seed=$seed | tail -1 > $DIR/draw-$seed &
done
wait
cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38
.venv/bin/drscreen export soup $(cat $DIR/draw-36 $DIR/draw-37 $DIR/draw-38) --out $DIR/soup
mkdir -p var/cand20/members
for m in mnv2-regression/1.3.0 lite2-se-multitask/1.3.0 lite1-cbam-multitask/1.8.0; do
  mkdir -p var/cand20/members/$(dirname $m); cp -r models/members/$m var/cand20/members/$m
done
.venv/bin/drscreen export member $DIR/soup --name lite1-cbam-multitask --version 2.0.0 --models-dir var/cand20
for seed in 36 37 38; do
  .venv/bin/drscreen export member "$(cat $DIR/draw-$seed)" --name lite1-long-d$seed --version 2.0.0 --models-dir var/cand20
done
DRSCREEN_MODELS_DIR=var/cand20 .venv/bin/drscreen export ensemble --member mnv2-regression@1.3.0 \
  --member lite1-cbam-multitask@2.0.0 --member lite2-se-multitask@1.3.0 --name cand-long --version 1.7.0 \
  --validation-only --models-dir var/cand20 2>&1 | tail -40
DRSCREEN_MODELS_DIR=var/cand20 .venv/bin/python scripts/seed_bag_check.py \
  --draws lite1-long-d36@2.0.0 lite1-long-d37@2.0.0 lite1-long-d38@2.0.0 lite1-cbam-multitask@2.0.0 \
  --others mnv2-regression@1.3.0 lite2-se-multitask@1.3.0 2>&1 | tail -30
