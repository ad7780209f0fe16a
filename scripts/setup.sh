#!/usr/bin/env bash
# Create .venv (Python 3.11) and install codefill into it, editable.
#   bash scripts/setup.sh        runtime only (what `codefill serve` needs)
#   bash scripts/setup.sh test   plus the test tools and the reference implementation (torch, transformers)
# Re-running is cheap: the install is skipped while pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
extras=""
[ "${1:-}" = test ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.codefill-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-test}"
if [ ! -f "$stamp" ]; then
  # pip's and setuptools' chatter goes to a log, shown only when the install fails.
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip setuptools wheel \
         && .venv/bin/python -m pip install -e ".${extras}"; } >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "setup failed; the full pip log is $log" >&2
    exit 1
  fi
  rm -f .venv/.codefill-*
  touch "$stamp"
  [ -n "$extras" ] && touch ".venv/.codefill-$(sha256sum pyproject.toml | cut -c1-16)"
fi

# bubblewrap: the isolation `codefill eval` runs every generated program in (evaluation/sandbox.py). Without
# it evaluation still runs, with rlimits and no network only, and says so.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >.venv/apt-bubblewrap.log 2>&1; then
      echo "note: apt-get install bubblewrap failed (see .venv/apt-bubblewrap.log); the evaluation sandbox" \
           "falls back to rlimits and no network" >&2
    fi
  else
    echo "note: bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) for the" \
         "evaluation sandbox's filesystem, PID and IPC isolation" >&2
  fi
fi
echo "environment ready: .venv ($(.venv/bin/python --version))"
