"""CPU training speed of the candidate shapes, side by side in one run: the trainer's own graphs (forward,
backward, accumulation, AdamW), rows of 1,024, 2 x 4 rows a step, as the recipes train. Writes
experiments/sweep/bench_shapes.json; each shape's step time fixes the steps it gets in two hours.

    .venv/bin/python experiments/sweep/bench_shapes.py
"""
import json
from dataclasses import replace

from codefill.bench_train import run
from codefill.model.config import LlamaConfig

base = LlamaConfig(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=8192, ffn_dim=768, norm_eps=1e-5,
                   rope_theta=1e6, max_seq_len=1024)  # v2, the bundled model before v4
shapes = {"9m_256x6": {}, "small_192x6": dict(dim=192, n_heads=3, n_kv_heads=1, ffn_dim=576),
          "192x4": dict(dim=192, n_layers=4, n_heads=3, n_kv_heads=1, ffn_dim=576),
          "256x4": dict(n_layers=4)}
out = {}
for name, changes in shapes.items():
    arch = replace(base, **changes)
    r = run(f"eval_results/sweep/bench_{name}", preset=name, seq_length=1024, micro_batch=2, grad_accum=4, steps=3,
            arch=arch)
    out[name] = {"params": arch.n_params(), "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s_median"]}
    print(name, out[name], flush=True)
with open("experiments/sweep/bench_shapes.json", "w") as f:
    json.dump(out, f, indent=1)
