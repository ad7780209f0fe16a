"""Which model size this CPU can serve: `codefill bench size`.

Candidate shapes (SIZES, Code Llama's architecture with the bundled model's 8,192-piece tokenizer and 1,024-token
context, as the PyPI recipes train) get random weights stored in float16, the form a model would be bundled in.
Each is served by a real `codefill serve` (the pygls client of bench_lsp) and measured for the three limits of a
bundled model:

- `storage`: bytes of its model directory (weights, tokenizer, config), at most `max_storage_bytes`;
- `typing p50`: the serial typing replay of bench_lsp (argparse.py typed back, the next key after the answer),
  suggestion p50 at most `max_typing_ms`;
- `cold`: the first suggestion on a document the server has not seen, its prompt filled to the budget (the
  context less the new tokens: 1,008 ids), median of COLD_FILES, at most `max_cold_ms`. Cross-file context is
  off, so no cached prompt is shared with it.

Random weights never stop early, so every suggestion runs its `max_new_tokens`: a trained model's are no slower.
The chosen size is the candidate with the most parameters within every limit. Writes `size.json` and `size.md`.

With `models` (`codefill bench size --model MODEL_DIR`: that model beside the bundled one) the rows are those
trained model directories as stored, measured the same way against the same limits, each with its own tokenizer:
whether a model meant to be bundled keeps within them, side by side with the one it would replace.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from codefill.bench_lsp import inline_request, line_col, open_document, replay, replay_cursor, serving
from codefill.bench_workers import SOURCE_FILE, source_name
from codefill.model.config import LlamaConfig

VOCAB_SIZE, CONTEXT = 8192, 1024  # the PyPI recipes' tokenizer and training length


def _shape(dim: int, n_layers: int, n_kv_heads: int, ffn_dim: int) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=dim // 64, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                       vocab_size=VOCAB_SIZE, rope_theta=1e6, max_seq_len=CONTEXT)


# Smallest first: the bundled model's shape, the PyPI recipe's first guess, two ways to spend ~19 M parameters
# (deep and narrow, wide and shallow), and two beyond 40 MB that show how much headroom speed leaves.
SIZES: dict[str, LlamaConfig] = {
    "d192-l4": _shape(192, 4, 1, 576),
    "d320-l6": _shape(320, 6, 1, 864),
    "d320-l12": _shape(320, 12, 1, 864),
    "d384-l8": _shape(384, 8, 2, 1024),
    "d448-l8": _shape(448, 8, 1, 1216),
    "d640-l10": _shape(640, 10, 2, 1728),
}

# Documents for the cold prompts: large standard-library files, the cursor at a line start this far in.
COLD_FILES = ("typing.py", "inspect.py", "difflib.py")
COLD_AT = 0.6


def build_candidate(path: Path, config: LlamaConfig, tokenizer_path: Path, seed: int = 0) -> Path:
    """A MODEL_DIR of `config` with random float16 weights and the given tokenizer (kept if already built)."""
    from codefill.model.checkpoint import save_model_dir
    from codefill.model.tiny import random_weights

    if (path / "config.json").is_file():
        return path
    weights = {k: v.astype(np.float16) for k, v in random_weights(config, seed).items()}
    return save_model_dir(path, config, weights, tokenizer_path, note=f"random weights for bench size (seed {seed})",
                          overwrite=True)


def _cold_documents(prompt_tokens: int, tok) -> list[tuple[str, str, int]]:
    """(name, text, cursor) per COLD_FILES, each with more than the prompt's share of ids on both sides."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in COLD_FILES:
        text = (stdlib / name).read_text()
        cursor = text.index("\n", int(len(text) * COLD_AT)) + 1
        if len(tok.encode(text[cursor - 8 * prompt_tokens:cursor])) < prompt_tokens or \
                len(tok.encode(text[cursor:cursor + 4 * prompt_tokens])) < prompt_tokens // 4:
            raise RuntimeError(f"{stdlib / name} has too little text around offset {cursor} "
                               f"for a cold prompt of {prompt_tokens} ids")
        docs.append((name, text, cursor))
    return docs


async def _measure(model_dir: Path, text: str, cursor: int, keystrokes: int, cold_docs, options: dict) -> dict:
    async with serving(model_dir, options, CONTEXT) as client:
        typing, _ = await replay(client, text, cursor, keystrokes, None)  # compiles first (not counted)
        cold = []
        for i, (name, doc, at) in enumerate(cold_docs):
            uri = f"file:///bench/cold-{i}/{name}"
            open_document(client, uri, doc)
            line, col = line_col(doc, at)
            sent = time.perf_counter()
            await asyncio.wait_for(inline_request(client, uri, line, col, f"cold-{i}"), 300)
            cold.append(round((time.perf_counter() - sent) * 1000, 1))
    return {"typing": typing, "cold_ms": cold}


def over_limits(row: dict, limits: dict) -> list[str]:
    """The limits a measured row exceeds (storage, typing, cold); limits are inclusive."""
    return [what for what, bad in (("storage", row["storage_bytes"] > limits["max_storage_bytes"]),
                                   ("typing", row["typing_p50_ms"] > limits["max_typing_ms"]),
                                   ("cold", row["cold_ms"] > limits["max_cold_ms"])) if bad]


def choose(rows: list[dict], limits: dict) -> str | None:
    """The name of the row with the most parameters within every limit (None when none is)."""
    fits = [r for r in rows if not over_limits(r, limits)]
    return max(fits, key=lambda r: r["params"])["name"] if fits else None


def run(out_dir: str | Path, *, sizes: dict[str, LlamaConfig] | None = None, keystrokes: int = 40,
        max_new_tokens: int = 16, max_storage_bytes: int = 40_000_000, max_typing_ms: float = 150.0,
        max_cold_ms: float = 1500.0, tokenizer_path: str | Path | None = None,
        models: dict[str, str | Path] | None = None) -> dict:
    from codefill.bundled import bundled_model_dir
    from codefill.model.checkpoint import load_tokenizer, read_model_config
    from codefill.model.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = SIZES if sizes is None else sizes
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else bundled_model_dir() / "tokenizer.model"
    tok = Tokenizer(tokenizer_path)
    prompt_tokens = CONTEXT - max_new_tokens
    text = (Path(sysconfig.get_paths()["stdlib"]) / SOURCE_FILE).read_text()
    cursor = replay_cursor(text)
    options = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": prompt_tokens, "context_chunks": 0,
               "log_dir": str(out_dir / "size-telemetry")}
    limits = {"max_storage_bytes": max_storage_bytes, "max_typing_ms": max_typing_ms, "max_cold_ms": max_cold_ms}
    if models is None:
        candidates = {}
        for name, config in sizes.items():
            config = LlamaConfig.from_dict({**config.to_dict(), "vocab_size": tok.vocab_size})
            candidates[name] = (build_candidate(out_dir / "size-models" / name, config, tokenizer_path), config)
    else:
        candidates = {name: (Path(d), read_model_config(Path(d))[0]) for name, d in models.items()}
    rows = []
    for name, (model_dir, config) in candidates.items():
        # enough text around each cold cursor for a full prompt in this model's own ids (a given model's tokenizer
        # is not the bundled one)
        cold_docs = _cold_documents(prompt_tokens, load_tokenizer(model_dir))
        m = asyncio.run(_measure(model_dir, text, cursor, keystrokes, cold_docs, options))
        row = {"name": name, "params": config.n_params(), "dim": config.dim, "n_layers": config.n_layers,
               "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn_dim": config.ffn_dim,
               "storage_bytes": sum(f.stat().st_size for f in model_dir.iterdir()),
               "typing_p50_ms": m["typing"]["suggestion_ms_p50"], "typing_p95_ms": m["typing"]["suggestion_ms_p95"],
               "cold_ms": statistics.median(m["cold_ms"]), "cold_each_ms": m["cold_ms"]}
        rows.append(row)
        print(f"[bench size] {name}: {row['params'] / 1e6:.1f} M params, {row['storage_bytes'] / 1e6:.1f} MB, "
              f"typing p50 {row['typing_p50_ms']} ms, cold {row['cold_ms']} ms", file=sys.stderr, flush=True)
    report = {"limits": limits, "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
              "models": None if models is None else {name: str(d) for name, d in models.items()},
              "keystrokes": keystrokes, "source": source_name(), "cold_files": list(COLD_FILES),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "rows": rows, "chosen": choose(rows, limits)}
    (out_dir / "size.json").write_text(json.dumps(report, indent=2))
    (out_dir / "size.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lim = r["limits"]
    what = (f"Random float16 weights in Code Llama's architecture, vocabulary {VOCAB_SIZE}, context {CONTEXT}"
            if not r.get("models") else "Trained models as stored (" +
            ", ".join(f"{name}: `{d}`" for name, d in r["models"].items()) + "), each with its own tokenizer")
    lines = [
        "# Model size the CPU can serve (`codefill bench size`)", "",
        f"{what}, served by `codefill serve`. Typing: {r['keystrokes']} keys of {r['source']}, the next key after the "
        f"answer, suggestions of {r['max_new_tokens']} tokens. Cold: the first suggestion on an unseen document, a "
        f"{r['prompt_tokens']}-id prompt, median of {', '.join(r['cold_files'])}. Machine: {r['machine']}.", "",
        f"Limits: storage at most {lim['max_storage_bytes'] / 1e6:g} MB, typing p50 at most {lim['max_typing_ms']:g} "
        f"ms, cold at most {lim['max_cold_ms']:g} ms.", "",
        "| shape | params | dim | layers | heads / kv | ffn | storage MB | typing p50 ms | typing p95 ms | cold ms "
        "(each) | within limits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in r["rows"]:
        over = over_limits(row, lim)
        lines.append(f"| {row['name']} | {row['params'] / 1e6:.1f} M | {row['dim']} | {row['n_layers']} | "
                     f"{row['n_heads']} / {row['n_kv_heads']} | {row['ffn_dim']} | {row['storage_bytes'] / 1e6:.1f} | "
                     f"{row['typing_p50_ms']} | {row['typing_p95_ms']} | {row['cold_ms']} "
                     f"({', '.join(str(c) for c in row['cold_each_ms'])}) | "
                     f"{'yes' if not over else 'no: ' + ', '.join(over)} |")
    if r.get("models"):
        within = ", ".join(row["name"] for row in r["rows"] if not over_limits(row, lim)) or "none"
        verdict = f"Within every limit: {within}."
    elif r["chosen"]:
        verdict = f"**Chosen: {r['chosen']}**, the most parameters within every limit."
    else:
        verdict = "**No candidate is within every limit.**"
    lines += ["", verdict, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "bench_results"), indent=2))
