"""`codefill bench train`: training throughput and model FLOPs utilisation (MFU), on random weights.

`run(out_dir, preset="small", seq_length=256, micro_batch=2, grad_accum=2, steps=5, lora=False)` times full
optimiser steps (forward, backward, accumulation, clipping, AdamW: the trainer's own graphs) after one
warm-up step that compiles them, and measures the machine's peak in the same run: the best of a few
float32 [n, n] @ [n, n] MatMul graphs (2 n^3 FLOPs each). Model FLOPs per token follow the PaLM appendix:
6 * N (N = parameters excluding the embedding) + 12 * n_layers * dim * seq_length (attention), for a full
finetune; with LoRA the weight-gradient third of the matmul work is skipped, so 4 * N is counted instead.
Writes `train.json` and `train.md` to out_dir and returns the JSON's dict.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def matmul_peak_flops(n: int = 1024, reps: int = 5) -> float:
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    class MM(nn.Cell):
        def __init__(self):
            super().__init__()
            self.mm = ops.MatMul()

        def construct(self, a, b):
            return self.mm(a, b)

    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = Tensor(rng.standard_normal((n, n), dtype=np.float32))
    net = MM()
    net(a, b).asnumpy()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        net(a, b).asnumpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def run(out_dir: str | Path, preset: str = "small", seq_length: int = 256, micro_batch: int = 2,
        grad_accum: int = 2, steps: int = 5, lora: bool = False, arch=None, device: str = "cpu") -> dict:
    """`arch`: a LlamaConfig to time instead of the preset (`preset` is then only its label)."""
    import mindspore as ms
    from mindspore import Tensor

    from codefill.model.config import preset as get_preset
    from codefill.model.device import configure_mindspore
    from codefill.model.tiny import random_weights
    from codefill.training.optimizer import Optimizer
    from codefill.training.train_config import PRESETS, LoraConfig
    from codefill.training.trainer import training_network

    configure_mindspore(device)
    arch = arch if arch is not None else get_preset(preset)
    cfg = replace(PRESETS["lora" if lora else "full"], seq_length=seq_length, micro_batch=micro_batch,
                  grad_accum=grad_accum, max_steps=steps + 1, lora=LoraConfig(dropout=0.0) if lora else None)
    network = training_network(arch, random_weights(arch), replace(cfg, seed=0))
    net, trained = network.loss_net, network.trained
    opt = Optimizer(net, trained, cfg)
    rng = np.random.default_rng(0)
    x = rng.integers(0, arch.vocab_size, (micro_batch, seq_length), dtype=np.int32)
    y = rng.integers(0, arch.vocab_size, (micro_batch, seq_length), dtype=np.int32)

    def step() -> None:
        total = 0.0
        for m in range(grad_accum):
            total += float(opt.accumulate(Tensor(x), Tensor(y), Tensor(float(m + 1), ms.float32)).asnumpy())
        loss, _ = opt.apply(Tensor(float(y.size * grad_accum), ms.float32), Tensor(1e-5, ms.float32),
                            Tensor(total, ms.float32))
        loss.asnumpy()

    t = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = micro_batch * grad_accum * seq_length
    tokens_per_s = tokens / step_s
    n_matmul = arch.n_params() - arch.vocab_size * arch.dim  # the embedding is a lookup, not a matmul
    per_token = (4 if lora else 6) * n_matmul + 12 * arch.n_layers * arch.dim * seq_length
    peak = matmul_peak_flops()
    report = {
        "preset": preset, "architecture": arch.to_dict(), "parameters": arch.n_params(), "mode": "lora" if lora else "full", "seq_length": seq_length,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "steps_timed": steps,
        "step_s_median": step_s, "first_step_s_incl_compile": compile_s, "tokens_per_s": tokens_per_s,
        "model_flops_per_token": per_token, "achieved_flops": per_token * tokens_per_s,
        "matmul_peak_flops": peak, "mfu": per_token * tokens_per_s / peak,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "train.md").write_text(
        f"# codefill bench train ({preset}, {report['mode']})\n\n"
        f"| tokens/s | step (median) | MFU | achieved GFLOP/s | matmul peak GFLOP/s |\n|---|---|---|---|---|\n"
        f"| {tokens_per_s:,.0f} | {step_s:.3f} s | {report['mfu']:.1%} | {report['achieved_flops'] / 1e9:.1f} | "
        f"{peak / 1e9:.1f} |\n")
    return report
