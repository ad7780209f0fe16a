"""`codefill bench profile`: where a decode step and a prefill chunk spend their time, per MindSpore op.

`run(out_dir, preset="small")` builds a Runner on seeded random weights (batch 1, a 2048-position cache),
prefills 256 tokens, then in one child process per phase runs MindSpore's profiler over

- decode: 20 decode steps (one token each, after the 256-token prompt),
- prefill: 3 prefills of one 512-token chunk,

and reads its per-op-type table (`cpu_op_type_info_0.csv`: calls, total compute time). Beside it, the same
calls timed without the profiler give the wall time per call, so the report shows how much of a step is the
ops' own compute and how much is everything around them (launching each op, inputs, outputs). Writes
`profile.json` and `profile.md` to out_dir.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE_STEPS, PREFILL_CALLS, PREFILL_CHUNK, PROMPT = 20, 3, 512, 256


def _phase(phase: str, preset: str, seed: int, profile_dir: str) -> dict:
    """Child process: time the phase's calls, then profile them; returns wall times and the op table."""
    import mindspore as ms
    import numpy as np

    from codefill.bench_model import random_weights
    from codefill.inference_workers.runner import Runner
    from codefill.model.config import preset as get_preset

    cfg = get_preset(preset)
    runner = Runner(cfg, random_weights(cfg, seed), max_seq_len=2048, max_batch=1)
    ids = np.random.default_rng(seed + 1).integers(3, cfg.vocab_size, PROMPT + PREFILL_CHUNK).tolist()
    runner.prefill(ids[:PROMPT])
    if phase == "decode":
        n = DECODE_STEPS
        call = lambda i: runner.decode_step([7], [PROMPT + i])  # noqa: E731
    else:
        n = PREFILL_CALLS
        call = lambda i: runner.prefill(ids[PROMPT:], 0, PROMPT)  # noqa: E731
    for i in range(3):
        call(i)  # compiled and warm
    wall = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        wall.append(time.perf_counter() - t)
    profiler = ms.Profiler(output_path=profile_dir)
    for i in range(n):
        call(i)
    profiler.stop()
    profiler.analyse()
    (table,) = Path(profile_dir).glob("*/FRAMEWORK/cpu_op_type_info_0.csv")
    ops = []
    with open(table) as f:
        for row in csv.DictReader(f):
            ops.append({"op": row["op_type"], "calls_per_call": int(row["type_occurrences"]) / n,
                        "ms_per_call": float(row["total_compute_time"]) / n})
    ops.sort(key=lambda o: -o["ms_per_call"])
    return {"calls": n, "wall_ms": 1e3 * statistics.median(wall), "ops": ops,
            "op_ms": sum(o["ms_per_call"] for o in ops), "op_launches": sum(o["calls_per_call"] for o in ops)}


def run(out_dir: str | Path, preset: str = "small", seed: int = 0) -> dict:
    import mindspore

    result = {"preset": preset, "seed": seed, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                          "mindspore": mindspore.__version__}}
    for phase in ("decode", "prefill"):
        with tempfile.TemporaryDirectory() as tmp:
            code = ("import json, sys; from codefill.bench_profile import _phase; "
                    f"print(json.dumps(_phase({phase!r}, {preset!r}, {seed}, {tmp!r})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"profiling {phase} failed:\n{done.stderr[-3000:]}")
            result[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    (out / "profile.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [f"# Per-op profile: preset `{r['preset']}`, batch 1, fp32, a 2048-position cache", "",
             f"MindSpore {r['machine']['mindspore']} profiler, {r['machine']['cpus']} CPUs. "
             f"Decode: one step after a {PROMPT}-token prompt; prefill: one {PREFILL_CHUNK}-token chunk after it.", ""]
    for phase in ("decode", "prefill"):
        p = r[phase]
        other = p["wall_ms"] - p["op_ms"]
        lines += [f"## {phase}: {p['wall_ms']:.2f} ms per call (median, without the profiler)", "",
                  f"{p['op_launches']:.0f} op launches per call; the ops' own compute is {p['op_ms']:.2f} ms "
                  f"({100 * p['op_ms'] / p['wall_ms']:.0f}%), everything else {other:.2f} ms "
                  f"({100 * other / p['wall_ms']:.0f}%).", "",
                  "| op | launches per call | ms per call | share of op time |", "| --- | ---: | ---: | ---: |"]
        for o in p["ops"]:
            lines.append(f"| {o['op']} | {o['calls_per_call']:.0f} | {o['ms_per_call']:.3f} | "
                         f"{100 * o['ms_per_call'] / p['op_ms']:.1f}% |")
        lines.append("")
    return "\n".join(lines)
