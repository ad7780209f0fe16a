#!/usr/bin/env bash
# README command (a): set up, build the default model if it is missing, start the completion service
# (`codefill serve --stdio`) and show a live completion coming back through the language server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${CODEFILL_MODEL:-models/default}
if [ ! -f "$model/config.json" ]; then
  # Until the bundled trained model lands (issue 6), the default is an untrained tiny model built here.
  .venv/bin/codefill init-tiny --output "$model"
fi
exec .venv/bin/codefill demo --model "$model"
