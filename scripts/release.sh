#!/usr/bin/env bash
# Reproduce the released ensemble from scratch: train every member, export each as float16
# (kept only if it changes no validation grade), then fit and write the ensemble.
#   scripts/release.sh VERSION [--skip-training]
# Training three members takes about 45-60 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/release.sh VERSION [--skip-training]}
members=(lite0-multitask mnv2-regression lite1-cbam-multitask)
configs=(configs/member-lite0-multitask.toml configs/member-mnv2-regression.toml configs/member-lite1-cbam-multitask.toml)
if [[ "${2:-}" != "--skip-training" ]]; then
  for cfg in "${configs[@]}"; do .venv/bin/drscreen train --config "$cfg"; done
fi
refs=()
for name in "${members[@]}"; do
  run=$(ls -d runs/*-"$name" | sort | tail -1)   # newest run of that member
  .venv/bin/drscreen export member "$run" --name "$name" --version "$version" --half
  refs+=(--member "$name@$version")
done
.venv/bin/drscreen export ensemble "${refs[@]}" --name drscreen-ensemble --version "$version"
