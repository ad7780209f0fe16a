#!/usr/bin/env bash
# README command (b): set up the environment with test extras and run every test, the real-editor tests
# (Neovim 0.12, VS Code in code-server) included: scripts/setup_editors.sh installs what they need.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_editors.sh
(cd editor_clients/nvim && luacheck --no-color -q . && ../.deps/tools/node_modules/.bin/stylua --check .)
# Every import resolves, statically (pyrightconfig.json: import resolution only, no type checking).
editor_clients/.deps/tools/node_modules/.bin/pyright
export CODEFILL_EDITOR_TESTS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
