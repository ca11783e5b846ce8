#!/usr/bin/env bash
# Train every ensemble member in turn (each config reproduces one released member).
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in "$@"; do
  .venv/bin/drscreen train --config "$cfg" || .venv/bin/python -m ml.training "$cfg"
done
