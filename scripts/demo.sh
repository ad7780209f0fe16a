#!/usr/bin/env bash
# README command (a): set up, start the completion service (`codefill serve --stdio`) on the bundled model
# (models/codefill-pypi-5m, trained by `codefill recipe recipes/codefill-pypi-cpu.toml`) and show live completions
# coming back through the language server. CODEFILL_MODEL=DIR serves another MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${CODEFILL_MODEL:-models/codefill-pypi-5m}
if [ ! -f "$model/config.json" ]; then
  echo "no model at $model: the bundled model ships in the repository (git LFS is not used); rebuild it with" >&2
  echo "  the commands in its model card, models/codefill-pypi-5m/README.md (\"Recipe\")" >&2
  exit 1
fi
exec .venv/bin/codefill demo --model "$model"
