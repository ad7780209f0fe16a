#!/usr/bin/env bash
# One attempt of a `codefill recipe --trainer torch` run on a GPU machine with no network (issue 16).
#
#   scripts/gpu_train.sh RECIPE.toml RUN_DIR CORPUS_DIR [BUDGET_SECONDS]
#
# RUN_DIR was prepared where codefill runs in full (`codefill recipe RECIPE --output RUN_DIR --trainer torch
# --prepare`: tokenizer.model, init/, and, for a machine without SentencePiece, data/*-rows-*.npz.xz); CORPUS_DIR
# holds the `codefill data corpus` shards carried with it (any subset of train-*.jsonl.xz, every heldout-*).
# The whole attempt, building rows included, stops cleanly before BUDGET_SECONDS (default 540, nine minutes)
# with a checkpoint; run the same command again, with RUN_DIR carried back, to continue. Exit status 0 when the
# attempt ended as planned (finished, or stopped by the budget with a checkpoint), else the trainer's.
#
# With $OUT set (the device machine's folder of files that come back), it receives what the next step needs,
# every file under 16 MiB: metrics.jsonl, recipe.toml, and either hf/ (finished: `codefill convert --from-hf`)
# or checkpoint/ (the newest: carry it back as RUN_DIR/run/checkpoints/step-N, and metrics.jsonl as
# RUN_DIR/run/metrics.jsonl, to resume).
# CHECKPOINT_DTYPE (default bfloat16) halves the checkpoint: it has to travel both ways beside the corpus.
# TORCH_COMPILE=1 adds --compile (torch.compile of the training forward: faster steps after a compile of a
# minute or so; not yet tried on a GPU machine, so it is off by default).
#
# What to carry (64 MiB in all, the repository included): RUN_DIR/recipe.toml and tokenizer.model; init/ whole on
# the first attempt, or nothing of it where SentencePiece runs (init is seeded: it is written again, bit for
# bit); on later attempts only init/config.json and init/tokenizer.model beside run/checkpoints/step-N and
# run/metrics.jsonl (the initial weights are not read when a checkpoint is resumed); data/ only where
# SentencePiece is missing (otherwise the rows are built here, the same on every attempt from the same shards).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n 2,25p "$0"
    exit 2
fi
RECIPE=$(realpath -m "$1") RUN=$(realpath -m "$2") CORPUS=$(realpath -m "$3") BUDGET=${4:-540}
PY=${PYTHON:-python3}
START=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'PY'
import torch, transformers
cuda = torch.cuda.is_available()
print(f"[gpu_train] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"device {torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA: float32, slow)'}", flush=True)
try:
    import sentencepiece
    print(f"[gpu_train] sentencepiece {sentencepiece.__version__}: rows are built here from the text", flush=True)
except ImportError:
    print("[gpu_train] no sentencepiece: RUN_DIR/data must hold the rows (prepared with --prepare)", flush=True)
PY

LEFT=$(( BUDGET - ($(date +%s) - START) - 15 ))   # 15 s kept for collecting the results
set +e
"$PY" -m codefill.cli recipe "$RECIPE" --output "$RUN" --trainer torch --corpus "$CORPUS" --time-budget "$LEFT" \
    --checkpoint-dtype "${CHECKPOINT_DTYPE:-bfloat16}" ${TORCH_COMPILE:+--compile} --no-progress
RC=$?
set -e

LATEST=$(ls -d "$RUN"/run/checkpoints/step-* 2>/dev/null | tail -n 1 || true)
if [ -d "$RUN/run/hf" ]; then
    STATUS=finished
elif [ -n "$LATEST" ] && [ -f "$LATEST/COMPLETE" ] && [ $RC -eq 2 ]; then
    STATUS="stopped at $(basename "$LATEST") (budget): run again to continue"
else
    STATUS="failed ($RC)"
fi
if [ -n "${OUT:-}" ]; then
    cp "$RUN/recipe.toml" "$OUT/" 2>/dev/null || true
    cp "$RUN/run/metrics.jsonl" "$OUT/" 2>/dev/null || true
    if [ "$STATUS" = finished ]; then
        cp -r "$RUN/run/hf" "$OUT/hf"
        cp "$RUN/summary.json" "$OUT/" 2>/dev/null || true
    elif [ -n "$LATEST" ]; then
        cp -r "$LATEST" "$OUT/checkpoint"
    fi
fi
echo "[gpu_train] $STATUS after $(( $(date +%s) - START )) s"
case "$STATUS" in failed*) exit "$RC";; esac
exit 0
