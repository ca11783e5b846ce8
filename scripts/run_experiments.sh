#!/usr/bin/env bash
# Run every experiment variant in turn, then rebuild docs/experiments.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in ${@:-configs/exp/*.toml}; do
  .venv/bin/python -m ml.training "$cfg"
done
.venv/bin/python scripts/experiments_table.py
