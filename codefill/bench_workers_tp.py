"""Benchmark (a) of the tensor-parallel workers: prefill ms and decode tokens/s, TP=1 vs TP=2, same weights.

`run(out_dir, preset="small", seed=0, reps=3)` writes a MODEL_DIR-style config + safetensors of seeded
random weights (no tokenizer: ranks read only config.json and the weights), then runs one msrun job per
configuration, each through the real rank code (ranks.open_rank: shard, load, warm up) with rank 0 driving
the TensorParallelRunner directly, without sockets:

- prefill of 256 and 1024 random tokens into slot 0 (median of `reps` after a warm-up),
- the decode step (one token, batch 1, a 2048-position cache; median of 30 steps),
- decode tokens/s: 64 greedy tokens after a 256-token prompt, timed from the first token to the last.

Configurations: TP=1 with 2 kernel threads (the whole 2-core machine), TP=1 with 1 thread (one core, for
reference), TP=2 with 1 thread per rank (the launcher's default: cores / local ranks). Writes
`workers_tp.json` and `workers_tp.md` to out_dir and returns the JSON's dict.

    python -m codefill.bench_workers_tp OUT_DIR [--preset small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PREFILL_LENGTHS = (256, 1024)
DECODE_PROMPT, DECODE_TOKENS, DECODE_STEPS = 256, 64, 30
MAX_SEQ_LEN = 2048
CONFIGS = (("tp1_2threads", 1, 2), ("tp1_1thread", 1, 1), ("tp2_1thread", 2, 1))  # name, tp, threads per rank


def write_bench_model(out_dir: Path, preset: str, seed: int) -> Path:
    """config.json + model.safetensors of random weights (std 0.02, norms 1), in the MODEL_DIR layout."""
    from codefill.bench_model import random_weights
    from codefill.model import checkpoint
    from codefill.model.config import preset as get_preset
    from codefill.model.safetensors_io import write_safetensors

    cfg = get_preset(preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / checkpoint.WEIGHTS_NAME, random_weights(cfg, seed))
    checkpoint.write_json_synced(out_dir / checkpoint.CONFIG_NAME, {
        "format": checkpoint.FORMAT, "version": checkpoint.VERSION, "architecture": cfg.to_dict(),
        "dtype": "float32", "note": f"benchmark weights: random, preset {preset!r}, seed {seed}"})
    return out_dir


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _rank_main(argv: list[str]) -> None:
    """What each msrun rank runs: rank 0 measures, the others follow."""
    from codefill.inference_workers.ranks import open_rank

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t = time.perf_counter()
    runner = open_rank(args.model, args.tp, max_seq_len=MAX_SEQ_LEN, max_batch=1, threads=args.threads)
    if runner is None:
        return
    startup_s = time.perf_counter() - t
    try:
        rng = np.random.default_rng(args.seed + 1)
        prompts = {n: rng.integers(3, runner.vocab_size, n).tolist() for n in PREFILL_LENGTHS}
        prefill_ms = {n: _median_ms(lambda n=n: runner.prefill(prompts[n], 0, 0), args.reps) for n in PREFILL_LENGTHS}
        runner.prefill(prompts[DECODE_PROMPT], 0, 0)
        step_ms = _median_ms(lambda: runner.decode_step([7], [DECODE_PROMPT]), DECODE_STEPS)
        rates = []
        for _ in range(args.reps):
            logits = runner.prefill(prompts[DECODE_PROMPT], 0, 0)
            token, pos = int(np.argmax(logits)), DECODE_PROMPT
            t = time.perf_counter()
            for _ in range(DECODE_TOKENS - 1):
                token = int(np.argmax(runner.decode_step([token], [pos])[0]))
                pos += 1
            rates.append((DECODE_TOKENS - 1) / (time.perf_counter() - t))
        result = {"tp": args.tp, "threads_per_rank": args.threads, "startup_s": startup_s,
                  "prefill_ms": prefill_ms, "decode_step_ms": step_ms,
                  "decode_tokens_per_s": statistics.median(rates), "graphs_compiled": runner.compiled_graphs()}
    finally:
        runner.close()
    Path(args.out).write_text(json.dumps(result))


def _run_config(model_dir: Path, tp: int, threads: int, reps: int, seed: int, work: Path) -> dict:
    from codefill.inference_workers.launch import start_job

    out = work / f"tp{tp}-t{threads}.json"
    job = start_job(Path(__file__), ["--rank", "--model", str(model_dir), "--tp", str(tp), "--threads",
                                     str(threads), "--reps", str(reps), "--seed", str(seed), "--out", str(out)],
                    tp, run_dir=work / f"run-tp{tp}-t{threads}")
    try:
        job.process.wait(900)
    except subprocess.TimeoutExpired:
        pass
    finally:
        code = job.process.poll()
        job.stop(5)
    if code != 0 or not out.exists():
        raise RuntimeError(f"benchmark job tp={tp} threads={threads} failed ({code}):\n{job.rank_traceback()}")
    return json.loads(out.read_text())


def run(out_dir: str | Path, preset: str = "small", seed: int = 0, reps: int = 3) -> dict:
    import mindspore

    from codefill.model.config import preset as get_preset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="codefill-bench-tp-") as tmp:
        work = Path(tmp)
        model_dir = write_bench_model(work / "model", preset, seed)
        runs = {name: _run_config(model_dir, tp, threads, reps, seed, work) for name, tp, threads in CONFIGS}
    base, tp2 = runs["tp1_2threads"], runs["tp2_1thread"]
    ratios = {f"prefill_{n}_tp2_over_tp1": tp2["prefill_ms"][str(n)] / base["prefill_ms"][str(n)]
              for n in PREFILL_LENGTHS}
    ratios["decode_step_tp2_over_tp1"] = tp2["decode_step_ms"] / base["decode_step_ms"]
    ratios["decode_tokens_per_s_tp2_over_tp1"] = tp2["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    result = {
        "preset": preset, "config": get_preset(preset).to_dict(), "seed": seed, "reps": reps,
        "max_seq_len": MAX_SEQ_LEN,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "mindspore": mindspore.__version__},
        "runs": runs,
        "ratios": ratios,  # TP=2 (1 thread per rank) over TP=1 (2 threads); < 1 means TP=2 is faster
        "target": "decode_step_tp2_over_tp1 <= 1.3",
    }
    (out / "workers_tp.json").write_text(json.dumps(result, indent=2))
    (out / "workers_tp.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    c, runs = r["config"], r["runs"]
    names = [name for name, _, _ in CONFIGS]
    lines = [
        f"# Tensor-parallel workers: preset `{r['preset']}`, batch 1, fp32, {r['machine']['cpus']} CPUs",
        "",
        f"dim {c['dim']}, {c['n_layers']} layers, heads {c['n_heads']}/{c['n_kv_heads']}, ffn {c['ffn_dim']}, "
        f"vocab {c['vocab_size']}; cache {r['max_seq_len']} positions; MindSpore {r['machine']['mindspore']}; "
        f"real msrun ranks on this host. Medians of {r['reps']} runs after a warm-up (decode step: "
        f"{DECODE_STEPS}).",
        "",
        "| measure | " + " | ".join(f"TP={runs[n]['tp']}, {runs[n]['threads_per_rank']} thread(s)/rank" for n in names)
        + " | TP=2 / TP=1 (2 threads) |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for n in PREFILL_LENGTHS:
        lines.append(f"| prefill {n} tokens (ms) | " + " | ".join(f"{runs[x]['prefill_ms'][str(n)]:.1f}" for x in names)
                     + f" | {r['ratios'][f'prefill_{n}_tp2_over_tp1']:.2f}x |")
    lines.append("| decode step (ms) | " + " | ".join(f"{runs[x]['decode_step_ms']:.2f}" for x in names)
                 + f" | {r['ratios']['decode_step_tp2_over_tp1']:.2f}x (target <= 1.3x) |")
    lines.append(f"| decode, {DECODE_TOKENS} tokens after {DECODE_PROMPT} (tokens/s) | "
                 + " | ".join(f"{runs[x]['decode_tokens_per_s']:.1f}" for x in names)
                 + f" | {r['ratios']['decode_tokens_per_s_tp2_over_tp1']:.2f}x |")
    lines.append("| startup: join, load shard, compile (s) | "
                 + " | ".join(f"{runs[x]['startup_s']:.1f}" for x in names) + " | |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        _rank_main(sys.argv[2:])
    else:
        ap = argparse.ArgumentParser(prog="python -m codefill.bench_workers_tp")
        ap.add_argument("out_dir")
        ap.add_argument("--preset", default="small")
        ap.add_argument("--reps", type=int, default=3)
        a = ap.parse_args()
        print(_markdown(run(a.out_dir, a.preset, reps=a.reps)))
