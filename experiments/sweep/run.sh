#!/bin/bash
# Run every line of a run list (NAME key=value ...) as its own process on one GPU, stop stragglers after
# $LIMIT seconds, and merge the finished results into $OUT/sweep.json (logs: $OUT/logs.txt).
#   LIMIT=330 bash experiments/sweep/run.sh experiments/sweep/sweep2.txt
set -u
list=$(realpath "$1")
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/sweep-res
nvidia-smi -L
python3 -c "import torch, transformers, numpy; print(torch.__version__, transformers.__version__, numpy.__version__)"
grep -v '^#' "$list" | while read -r name args; do
  [ -n "$name" ] || continue
  # shellcheck disable=SC2086
  OUT=/tmp/sweep-res python3 -W ignore train.py "$name" $args > "/tmp/sweep-res/$name.log" 2>&1 &
done
( sleep "${LIMIT:-420}"; pkill -f "train.py" ) & watchdog=$!
sleep 5
while pgrep -f "python3 -W ignore train.py" > /dev/null; do sleep 5; done
kill "$watchdog" 2>/dev/null
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob("/tmp/sweep-res/*.json")}
json.dump(out, open(os.path.join(sys.argv[1], "sweep.json"), "w"))
print("finished:", sorted(out))
PY
for f in /tmp/sweep-res/*.log; do echo "== $f"; grep -v Warning "$f" | tail -n 16; done > "$OUT/logs.txt"
grep -E " held " "$OUT/logs.txt"
