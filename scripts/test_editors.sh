#!/usr/bin/env bash
# The real-editor tests: the Neovim plugin in Neovim 0.12 and the VS Code extension in code-server, each
# against the real `codefill serve` and a fake worker (scripted replies; the minimal Neovim setup runs the bundled
# model). Installs what they need first.
#   bash scripts/test_editors.sh                 all of them (about 2 minutes on 2 cores after the install)
#   bash scripts/test_editors.sh -k nvim         extra arguments go to pytest
# CODEFILL_SCREENSHOT_DIR=docs/images refreshes the README's screenshots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_editors.sh
(cd editor_clients/nvim && luacheck --no-color -q . && ../.deps/tools/node_modules/.bin/stylua --check .)
export CODEFILL_EDITOR_TESTS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_editor_nvim.py tests/test_editor_vscode.py "$@"
