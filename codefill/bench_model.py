"""Benchmark of the model engine against Hugging Face transformers on the same random weights, batch 1.

`run(out_dir, preset="small", seed=0)` measures, with codefill (MindSpore graphs) and with transformers
`LlamaForCausalLM` (torch fp32, no grad, its own KV cache) in the same process:

- prefill latency for 256 / 1024 / 2048-token prompts (logits of the last position only, on both sides:
  transformers is asked for `logits_to_keep=1` so neither computes a [T, vocab] output head it throws away),
- decode throughput: 64 greedy tokens after a 256-token prompt, timed from the first generated token to the
  last, so prefill is excluded (host-side sampling and log-probs are included for codefill),
- compile times of the two codefill graphs, reported separately (first call minus a warm call).

Then the anchor, side by side in the same run: llama.cpp (`codefill/llamacpp.py`, built on first use) and
codefill on the same weights, converted with `codefill convert --to-hf` and llama.cpp's own
`convert_hf_to_gguf.py` to f32 GGUF: the `small` architecture with a trained 512-piece tokenizer (what
`codefill init-tiny --preset small` writes) and the bundled model. Prefill of 1,024 tokens and decode of 64
tokens after them (llama-bench's decode at that depth: both engines attend over the prompt), each engine on the
same number of threads (the machine's cores). When llama.cpp cannot be built the
section says why and the rest of the report stands.

Every timing is the median of `reps` runs after a warm-up run, the engines taking turns (codefill, then
transformers, within each repetition; codefill and llama-bench in alternating rounds), so that the shared
machine's noisy stretches fall on both sides of a ratio. Writes `model.json` and `model.md` to out_dir and
returns the same dict as the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PREFILL_LENGTHS = (256, 1024, 2048)
DECODE_PROMPT, DECODE_TOKENS = 256, 64


def random_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights with a realistic scale (std 0.02, norms 1): logits neither flat nor huge."""
    from codefill.model.weights import expected_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    return out


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _decode_rate(step_tokens) -> float:
    """tokens/s over the decode steps of one generation: (n - 1) tokens from the first yield to the last."""
    it = iter(step_tokens())
    next(it)
    t, n = time.perf_counter(), 0
    for _ in it:
        n += 1
    return n / (time.perf_counter() - t)


def _codefill_engine(cfg, weights, prompts, device: str = "cpu") -> tuple[dict, Callable, Callable]:
    """codefill built and compiled: (its build facts, prefill(ids), generate(ids) -> token iterator)."""
    from codefill.inference_workers.runner import Runner
    from codefill.model.sampling import SamplingConfig

    t = time.perf_counter()
    gen = Runner(cfg, weights, max_seq_len=max(PREFILL_LENGTHS), max_batch=1, device=device)
    build_s = time.perf_counter() - t

    short = prompts[DECODE_PROMPT][:8]
    t = time.perf_counter()
    gen.prefill(short)
    first_prefill = time.perf_counter() - t
    t = time.perf_counter()
    gen.prefill(short)
    prefill_compile_s = first_prefill - (time.perf_counter() - t)
    t = time.perf_counter()
    gen.decode_step([1], [8])
    first_decode = time.perf_counter() - t
    t = time.perf_counter()
    gen.decode_step([1], [9])
    decode_compile_s = first_decode - (time.perf_counter() - t)
    info = {
        "build_s": build_s,
        "compile_s": {"prefill": prefill_compile_s, "decode": decode_compile_s},
        "graphs_compiled": gen.compiled_graphs(),
        "decode_step_ms": 1e3 * _median_s(lambda: gen.decode_step([1], [DECODE_PROMPT]), 20),
    }
    greedy = SamplingConfig()
    return info, gen.prefill, lambda ids: (token for token, _ in gen.generate(ids, DECODE_TOKENS, greedy))


def _hf_engine(cfg, weights) -> tuple[dict, Callable, Callable]:
    """transformers' LlamaForCausalLM on the same weights: (its build facts, prefill(ids), generate(ids))."""
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from codefill.model.weights import hf_name_map

    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")}
    t = time.perf_counter()
    model = LlamaForCausalLM(HFConfig(**hf_cfg)).eval()
    names = hf_name_map(cfg)
    model.load_state_dict({names[k]: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    build_s = time.perf_counter() - t

    @torch.no_grad()
    def prefill(ids):
        return model(torch.tensor([ids]), logits_to_keep=1, use_cache=False).logits

    @torch.no_grad()
    def generate(ids):
        out = model(torch.tensor([ids]), logits_to_keep=1, use_cache=True)
        cache = out.cache  # transformers >= 5 names the KV cache `cache` (formerly past_key_values)
        token = int(out.logits[0, -1].argmax())
        yield token
        for _ in range(DECODE_TOKENS - 1):
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.cache
            token = int(out.logits[0, -1].argmax())
            yield token

    info = {"build_s": build_s, "attn_implementation": model.config._attn_implementation,
            "torch_threads": torch.get_num_threads()}
    return info, prefill, generate


def _side_by_side(engines: dict[str, tuple[Callable, Callable]], prompts, reps: int) -> dict[str, dict]:
    """Every measure of every engine, the engines taking turns within each repetition (so a noisy stretch
    of the shared machine falls on both): per engine its median prefill ms per length and decode tokens/s."""
    out = {name: {"prefill_ms": {}, "decode_tokens_per_s": 0.0} for name in engines}
    for n in PREFILL_LENGTHS:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for rep in range(reps + 1):  # the first round warms up
            for name, (prefill, _) in engines.items():
                t = time.perf_counter()
                prefill(prompts[n])
                if rep:
                    times[name].append(time.perf_counter() - t)
        for name in engines:
            out[name]["prefill_ms"][n] = 1e3 * statistics.median(times[name])
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(reps + 1):
        for name, (_, generate) in engines.items():
            rate = _decode_rate(lambda: generate(prompts[DECODE_PROMPT]))
            if rep:
                rates[name].append(rate)
    for name in engines:
        out[name]["decode_tokens_per_s"] = statistics.median(rates[name])
    return out


def run(out_dir: str | Path, preset: str = "small", seed: int = 0, reps: int = 3, device: str = "cpu") -> dict:
    import mindspore
    import torch
    import transformers

    from codefill.model.config import preset as get_preset

    cfg = get_preset(preset)
    weights = random_weights(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    prompts = {n: rng.integers(3, cfg.vocab_size, n).tolist() for n in set(PREFILL_LENGTHS) | {DECODE_PROMPT}}

    ours_info, *ours_fns = _codefill_engine(cfg, weights, prompts, device)
    hf_info, *hf_fns = _hf_engine(cfg, weights)
    measured = _side_by_side({"codefill": tuple(ours_fns), "hf": tuple(hf_fns)}, prompts, reps)
    ours, hf = {**ours_info, **measured["codefill"]}, {**hf_info, **measured["hf"]}
    ratios = {f"prefill_{n}_speedup": hf["prefill_ms"][n] / ours["prefill_ms"][n] for n in PREFILL_LENGTHS}
    ratios["decode_speedup"] = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    anchor = _bench_anchor(Path(out_dir) / "anchor", reps, device)
    result = {
        "preset": preset,
        "config": cfg.to_dict(),
        "seed": seed,
        "reps": reps,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "mindspore": mindspore.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "codefill": ours,
        "hf": hf,
        "ratios": ratios,  # > 1 means codefill is faster
        "llamacpp": anchor,
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(result, indent=2))
    (out / "model.md").write_text(_markdown(result))
    return result


ANCHOR_PROMPT = 1024


ANCHOR_ROUNDS = 2  # codefill, llama.cpp, codefill, llama.cpp: the engines take turns


def _bench_anchor(work: Path, reps: int, device: str = "cpu") -> dict:
    """codefill and llama.cpp on the same weights (see the module docstring), or {"unavailable": why}. Each
    engine measures `reps` times per round, in alternating rounds; reported: the median over all of them."""
    from codefill import llamacpp
    from codefill.bundled import bundled_model_dir
    from codefill.inference_workers.runner import Runner
    from codefill.model.checkpoint import read_model_config
    from codefill.model.sampling import SamplingConfig
    from codefill.model.tiny import build_tiny_model_dir

    try:
        anchor = llamacpp.ensure()
    except llamacpp.AnchorUnavailable as e:
        return {"unavailable": str(e)}
    threads = os.cpu_count() or 1
    rows = {}
    small = work / "small-512"
    if not (small / "config.json").exists():
        build_tiny_model_dir(small, preset="small", overwrite=True)
    for name, model_dir in (("small (vocab 512)", small), ("bundled", bundled_model_dir())):
        n = min(ANCHOR_PROMPT, read_model_config(model_dir)[0].max_seq_len - DECODE_TOKENS)  # fits its context
        try:
            gguf = anchor.convert(model_dir, work / name.split()[0])
        except llamacpp.AnchorUnavailable as e:
            rows[name] = {"unavailable": str(e)}
            continue
        prompt = np.random.default_rng(7).integers(3, 500, n).tolist()
        runner = Runner.from_model_dir(model_dir, max_seq_len=n + DECODE_TOKENS, max_batch=1, device=device)
        runner.prefill(prompt[:8])  # compile both graphs first
        runner.decode_step([1], [8])
        runner.prefill(prompt)
        ours: dict[str, list[float]] = {"prefill_ms": [], "decode_tokens_per_s": []}
        theirs: dict[str, list[float]] = {"prefill_ms": [], "decode_tokens_per_s": []}
        try:
            for _ in range(ANCHOR_ROUNDS):
                for _ in range(reps):
                    t = time.perf_counter()
                    runner.prefill(prompt)
                    ours["prefill_ms"].append(1e3 * (time.perf_counter() - t))
                    ours["decode_tokens_per_s"].append(_decode_rate(
                        lambda: runner.generate(prompt, DECODE_TOKENS, SamplingConfig())))
                rates = anchor.bench(gguf, prompt=n, gen=DECODE_TOKENS, threads=threads, reps=reps)
                theirs["prefill_ms"].append(1e3 * n / rates["prefill_tokens_per_s"])
                theirs["decode_tokens_per_s"].append(rates["decode_tokens_per_s"])
        except llamacpp.AnchorUnavailable as e:
            rows[name] = {"unavailable": str(e)}
            continue
        finally:
            runner.close()
        rows[name] = {"prompt": n, "codefill": {k: statistics.median(v) for k, v in ours.items()},
                      "llamacpp": {k: statistics.median(v) for k, v in theirs.items()}}
    return {"version": anchor.version, "threads": threads, "rounds": ANCHOR_ROUNDS, "rows": rows}


def _anchor_markdown(a: dict) -> list[str]:
    if "unavailable" in a:
        return ["## Against llama.cpp", "", f"Not measured: {a['unavailable']}", ""]
    lines = ["## Against llama.cpp, same weights", "",
             f"{a['version']}, f32 GGUF, {a['threads']} threads each; a prompt of up to {ANCHOR_PROMPT} tokens "
             f"(what the model's context allows), then a decode of {DECODE_TOKENS} tokens after it (llama-bench "
             f"`-d`, at that depth); {a.get('rounds', 1)} alternating rounds of each engine, medians.", "",
             "| weights | prompt | codefill prefill (ms) | llama.cpp prefill (ms) | codefill decode (tok/s) | "
             "llama.cpp decode (tok/s) | codefill / llama.cpp decode |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in a["rows"].items():
        if "unavailable" in row:
            lines.append(f"| {name} | not measured: {row['unavailable'][:200]} | | | | | |")
            continue
        ours, theirs = row["codefill"], row["llamacpp"]
        lines.append(f"| {name} | {row['prompt']} | {ours['prefill_ms']:.0f} | {theirs['prefill_ms']:.0f} | "
                     f"{ours['decode_tokens_per_s']:.0f} | {theirs['decode_tokens_per_s']:.0f} | "
                     f"{ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x |")
    return lines + [""]


def _markdown(r: dict) -> str:
    ours, hf, ratio = r["codefill"], r["hf"], r["ratios"]
    c = r["config"]
    lines = [
        f"# Model benchmark: preset `{r['preset']}`, batch 1, fp32",
        "",
        f"dim {c['dim']}, {c['n_layers']} layers, heads {c['n_heads']}/{c['n_kv_heads']} (q/kv), "
        f"vocab {c['vocab_size']}; {r['machine']['cpus']} CPUs; MindSpore {r['machine']['mindspore']}, "
        f"torch {r['machine']['torch']} ({hf['torch_threads']} threads, {hf['attn_implementation']} attention), "
        f"transformers {r['machine']['transformers']}. Medians of {r['reps']} runs after a warm-up.",
        "",
        "| measure | codefill | transformers | codefill speedup |",
        "| --- | ---: | ---: | ---: |",
    ]
    for n in PREFILL_LENGTHS:
        lines.append(f"| prefill {n} tokens (ms) | {ours['prefill_ms'][n]:.1f} | {hf['prefill_ms'][n]:.1f} "
                     f"| {ratio[f'prefill_{n}_speedup']:.2f}x |")
    lines.append(f"| decode, {DECODE_TOKENS} tokens after {DECODE_PROMPT} (tokens/s) | "
                 f"{ours['decode_tokens_per_s']:.1f} | {hf['decode_tokens_per_s']:.1f} | {ratio['decode_speedup']:.2f}x |")
    lines += [
        "",
        f"codefill decode step: {ours['decode_step_ms']:.2f} ms. Compile (once per process): prefill graph "
        f"{ours['compile_s']['prefill']:.2f} s, decode graph {ours['compile_s']['decode']:.2f} s; "
        f"graphs compiled in the whole run: {ours['graphs_compiled']}.",
        "",
    ]
    lines += _anchor_markdown(r["llamacpp"])
    return "\n".join(lines)
