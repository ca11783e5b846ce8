#!/usr/bin/env bash
# Reproduce a released ensemble: train its members, export each as float16 (kept only if it
# changes no validation grade), then fit and write the ensemble (ml/ensemble_fit.py).
#   scripts/release.sh VERSION [--skip-training]
# 1.0.0: three members from ImageNet weights (~45-60 min on 2 CPU cores).
# 1.1.0: Lite1+CBAM warm-started from its 1.0.0 weights, a new Lite2+SE member, and MobileNetV2
#        1.0.0 unchanged (members picked out of fold on validation: docs/experiments.md); ~40 min.
# 1.2.0: EXPERIMENT, NOT SHIPPED (its out-of-fold figures miss the specificity target and it
#        does not beat 1.1.0; docs/experiments-findings.md, session 3). Three members from
#        ImageNet weights, each a stage 1 on the equalised set and then the cross-validated
#        natural stage (ml/training/crossval.py, 4 patient folds over the train + validation
#        patients); the ensemble is fitted on the members' out-of-fold probabilities (~45 min
#        with the three members in parallel, 1 thread each, on 2 cores). It writes into models/,
#        where the newest ensemble becomes the default: move it out unless it is to be shipped.
# 1.3.0: the three members of 1.1.0 retrained from ImageNet weights with stage 1 leaving out the
#        natural-colour patients' equalised copies (the leak of releases <= 1.2.0, docs/model.md);
#        each: stage 1 + the plain natural stage (runs/clean), and the cross-validated natural
#        stage from the same stage-1 checkpoint (runs/clean-cv). VARIANT=plain|cv picks which
#        members are exported (~60 min of training with the three in parallel on 2 cores).
# 1.4.0: 1.3.0 with its 0-weight Lite1+CBAM member retrained with stage 1 of 8 x 2000 instead of 4.
# 1.4.1: 1.4.0's members, re-fitted with the weighted average judged nested (session 6; no training).
# 1.4.2: the same members, with the equal-weight average as a candidate rule (session 6; no training).
# 1.4.3: the same members, rules and floors judged on 20 shuffles of the patient folds instead of 4
#        (session 9; no training): 1.4.2's sensitivity floor swung with the shuffle seeds.
# 1.5.0: 1.4.3's MobileNetV2 and Lite2+SE; Lite1+CBAM is a weight soup (ml/soup.py) of three
#        head-only natural stages (seeds 36/37/38) from one stage 1 (seed 33) of
#        configs/member-lite1-cbam-multitask-1.6.toml (docs/experiments.md, session 11; ~60 min).
# 1.6.0: 1.5.0 with its Lite1+CBAM soup rebuilt from the same stage-1 run, but from the stage-1 epoch
#        with the best natural-colour validation referable AUC (configs/member-lite1-cbam-multitask-1.8.toml,
#        stage1.select_on = "natural"; docs/experiments.md, session 13; ~35 min on an AVX-512 CPU).
# Releases up to 1.4.0 were fitted with --plain-weight-check (docs/experiments.md, session 6), and
# releases up to 1.4.2 with --repeats 4 and the pixels of revision 1 (cv2.GaussianBlur in Ben
# Graham's filter, ml/preprocess.py before session 9): with today's pixels their members retrain
# and their fits re-run within noise, not byte for byte (docs/experiments.md, session 9).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/release.sh VERSION [--skip-training]}

# runs started side by side share one pixel cache: build it (for config $1) first, so that each does not build its own copy
build_cache() {
  .venv/bin/python -c "from pathlib import Path; from ml.training.config import load_config; \
from ml.training.train import prepare_data; prepare_data(load_config('$1'), Path.cwd())"
}
newest_run() { ls -d "$1"/*-"$2" | sort | tail -1; }                 # newest run of member $2 in $1
final_cv_run() { ls -d "$1"/*-cv4-"$2"/*/ | sort | tail -1; }       # final run of its newest cross-validation
# export_release FINDER DIR: each of ${members[@]} from the run `FINDER DIR NAME` names, then the ensemble
export_release() {
  local refs=() name run
  for name in "${members[@]}"; do
    run=$("$1" "$2" "$name")
    .venv/bin/drscreen export member ${EXPORT_FORCE:-} "${run%/}" --name "$name" --version "$version" --half
    refs+=(--member "$name@$version")
  done
  .venv/bin/drscreen export ensemble ${EXPORT_FORCE:-} "${refs[@]}" --name drscreen-ensemble --version "$version" \
    --plain-weight-check --repeats 4
}

# soup_release CONFIG DIR MEMBER_VERSION [--skip-training]: a stage 1 of CONFIG, three head-only
# natural stages (seeds 36/37/38, 1 thread each) from its kept stage1/, their weight soup exported as
# lite1-cbam-multitask@MEMBER_VERSION, and the ensemble with 1.4.3's MobileNetV2 and Lite2+SE
soup_release() {
  local cfg=$1 dir=$2 member=$3 base seed
  if [[ "${4:-}" != "--skip-training" ]]; then
    build_cache "$cfg"
    base=$(.venv/bin/drscreen train --config "$cfg" --set two_stage=false --set "out_dir=\"$dir\"" | tail -1)
    for seed in 36 37 38; do
      .venv/bin/drscreen train --config "$cfg" --set threads=1 --set "out_dir=\"$dir\"" \
        --set "init_from=\"$base/stage1\"" --set stage1.epochs=0 --set seed=$seed | tail -1 >"$dir/draw-$seed" &
    done
    wait
    .venv/bin/drscreen export soup $(cat "$dir/draw-36" "$dir/draw-37" "$dir/draw-38") --out "$dir/soup"
  fi
  .venv/bin/drscreen export member ${EXPORT_FORCE:-} "$dir/soup" --name lite1-cbam-multitask --version "$member" --half
  .venv/bin/drscreen export ensemble ${EXPORT_FORCE:-} --member mnv2-regression@1.3.0 --member "lite1-cbam-multitask@$member" \
    --member lite2-se-multitask@1.3.0 --name drscreen-ensemble --version "$version"
}

if [[ "$version" == "1.6.0" ]]; then
  soup_release configs/member-lite1-cbam-multitask-1.8.toml runs/s13 1.8.0 "${2:-}"
  exit 0
fi
if [[ "$version" == "1.5.0" ]]; then
  soup_release configs/member-lite1-cbam-multitask-1.6.toml runs/s11 1.6.0 "${2:-}"
  exit 0
fi
if [[ "$version" == "1.4.1" || "$version" == "1.4.2" || "$version" == "1.4.3" ]]; then
  # 1.4.1 was chosen before the equal_average candidate existed (it would now be outranked): pin it
  pin=(); [[ "$version" == "1.4.1" ]] && pin=(--rule max_vote)
  repeats=(--repeats 4); [[ "$version" == "1.4.3" ]] && repeats=(--repeats 20)
  .venv/bin/drscreen export ensemble ${EXPORT_FORCE:-} --member mnv2-regression@1.3.0 --member lite1-cbam-multitask@1.4.0 \
    --member lite2-se-multitask@1.3.0 --name drscreen-ensemble --version "$version" "${pin[@]}" "${repeats[@]}"
  exit 0
fi
if [[ "$version" == "1.4.0" ]]; then
  # MobileNetV2 and Lite2+SE of 1.3.0 unchanged; Lite1+CBAM retrained with a longer clean stage 1
  # (chosen by the rule in docs/experiments.md, session 5; ~45 min on 1 thread).
  if [[ "${2:-}" != "--skip-training" ]]; then
    build_cache configs/member-lite1-cbam-multitask-1.4.toml
    .venv/bin/drscreen train --config configs/member-lite1-cbam-multitask-1.4.toml --set threads=1 \
      --set 'out_dir="runs/s5"'
  fi
  .venv/bin/drscreen export member ${EXPORT_FORCE:-} "$(newest_run runs/s5 lite1-cbam-multitask)" \
    --name lite1-cbam-multitask --version "$version" --half
  .venv/bin/drscreen export ensemble ${EXPORT_FORCE:-} --member mnv2-regression@1.3.0 --member "lite1-cbam-multitask@$version" \
    --member lite2-se-multitask@1.3.0 --name drscreen-ensemble --version "$version" \
    --plain-weight-check --repeats 4
  exit 0
fi
if [[ "$version" == "1.3.0" ]]; then
  members=(mnv2-regression lite1-cbam-multitask lite2-se-multitask)
  variant=${VARIANT:-plain}   # plain: chosen by the rule in docs/experiments.md (session 4)
  if [[ "${2:-}" != "--skip-training" ]]; then
    build_cache configs/member-mnv2-regression.toml
    for name in "${members[@]}"; do
      (
        run=$(.venv/bin/drscreen train --config "configs/member-$name.toml" --set threads=1 \
                --set 'out_dir="runs/clean"' | tail -1)
        .venv/bin/python -m ml.training.crossval --config "configs/member-$name.toml" \
          --stage1 "$run/stage1" --folds 4 --set threads=1 --set 'out_dir="runs/clean-cv"'
      ) &
    done
    wait
  fi
  if [[ "$variant" == "cv" ]]; then export_release final_cv_run runs/clean-cv; else export_release newest_run runs/clean; fi
  exit 0
fi
if [[ "$version" == "1.2.0" ]]; then
  members=(lite0-multitask mnv2-regression lite1-cbam-multitask)
  if [[ "${2:-}" != "--skip-training" ]]; then
    build_cache configs/member-lite0-multitask.toml
    for name in "${members[@]}"; do
      (
        run=$(.venv/bin/drscreen train --config "configs/member-$name.toml" --set threads=1 \
                --set two_stage=false --set 'out_dir="runs/cv"' | tail -1)
        .venv/bin/python -m ml.training.crossval --config "configs/member-$name.toml" \
          --stage1 "$run/best" --folds 4 --set threads=1 --set 'out_dir="runs/cv"'
      ) &
    done
    wait
  fi
  export_release final_cv_run runs/cv
  exit 0
fi
case "$version" in
  1.0.0)
    members=(lite0-multitask mnv2-regression lite1-cbam-multitask)
    configs=(configs/member-lite0-multitask.toml configs/member-mnv2-regression.toml configs/member-lite1-cbam-multitask.toml)
    versions=(1.0.0 1.0.0 1.0.0) ;;
  1.1.0)
    members=(mnv2-regression lite1-cbam-multitask lite2-se-multitask)
    configs=("" configs/member-lite1-cbam-multitask-1.1.toml configs/member-lite2-se-multitask.toml)
    versions=(1.0.0 1.1.0 1.1.0) ;;
  *) echo "no member list for release $version: add one to $0" >&2; exit 2 ;;
esac
if [[ "${2:-}" != "--skip-training" ]]; then
  for cfg in "${configs[@]}"; do [[ -z "$cfg" ]] || .venv/bin/drscreen train --config "$cfg"; done
fi
refs=()
for i in "${!members[@]}"; do
  name=${members[$i]} member_version=${versions[$i]}
  if [[ -n "${configs[$i]}" && "$member_version" == "$version" ]]; then
    run=$(newest_run runs "$name")
    .venv/bin/drscreen export member ${EXPORT_FORCE:-} "$run" --name "$name" --version "$version" --half
  fi
  refs+=(--member "$name@$member_version")
done
.venv/bin/drscreen export ensemble ${EXPORT_FORCE:-} "${refs[@]}" --name drscreen-ensemble --version "$version" \
    --plain-weight-check --repeats 4
