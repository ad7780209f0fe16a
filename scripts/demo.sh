#!/usr/bin/env bash
# README command (a): set up, start the completion service (`codefill serve --stdio`) on the bundled model
# (models/codefill-stdlib, trained by `codefill recipe recipes/codefill-stdlib.toml`) and show live completions
# coming back through the language server. CODEFILL_MODEL=DIR serves another MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${CODEFILL_MODEL:-models/codefill-stdlib}
if [ ! -f "$model/config.json" ]; then
  echo "no model at $model: the bundled model ships in the repository (git LFS is not used); rebuild it with" >&2
  echo "  .venv/bin/codefill recipe recipes/codefill-stdlib.toml --output runs/codefill-stdlib" >&2
  exit 1
fi
exec .venv/bin/codefill demo --model "$model"
