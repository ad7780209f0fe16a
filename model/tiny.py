"""An UNTRAINED tiny model: a small SentencePiece tokenizer plus seeded random weights, saved as a MODEL_DIR.

It exists so that tests, benchmarks and the README demo can run the whole stack (tokenizer, FIM prompt,
workers, LSP) on a laptop before a trained model is available. Its completions are noise; its config.json
says so in its "note".

The tokenizer is trained on a fixed list of Python standard library sources (the running interpreter's
`sysconfig.get_paths()["stdlib"]`), read in sorted order up to a character budget, so a build is
reproducible for a given Python and sentencepiece version and takes about a second.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, save_model_dir
from .config import LlamaConfig
from .config import preset as get_preset
from .tokenizer import Tokenizer
from .tokenizer_training import train_sentencepiece
from .weights import expected_shapes

# Present in every CPython 3.11+ stdlib; everyday Python (classes, comprehensions, strings, docstrings).
STDLIB_FILES = sorted([
    "argparse.py", "bisect.py", "calendar.py", "dataclasses.py", "fnmatch.py", "functools.py",
    "heapq.py", "json/decoder.py", "json/encoder.py", "pathlib.py", "shlex.py", "string.py",
    "textwrap.py", "typing.py",
])
TINY_NOTE = "UNTRAINED tiny model: random weights, for tests and demos only; its completions are noise"


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in STDLIB_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"standard library sources {missing} not found; the tiny tokenizer is trained on them")
    return paths


def random_weights(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """float32 weights: RMSNorm gains 1 (as a fresh Llama), everything else N(0, std), from one seeded stream."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return out


def build_tiny_model_dir(out_dir: str | Path, preset: str = "tiny-test", seed: int = 0, vocab_size: int = 512,
                         *, max_chars: int = 300_000, overwrite: bool = False) -> Path:
    """Train a `vocab_size`-piece tokenizer on stdlib sources, take the preset's architecture with that
    vocabulary, draw random weights with `seed`, and save a MODEL_DIR at `out_dir`."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = train_sentencepiece(stdlib_sources(), Path(tmp) / "tokenizer.model", vocab_size, max_chars=max_chars)
        config = dataclasses.replace(get_preset(preset), vocab_size=Tokenizer(tok_path).vocab_size)
        return save_model_dir(out_dir, config, random_weights(config, seed), tok_path,
                              note=f"{TINY_NOTE} (preset {preset!r}, seed {seed})", overwrite=overwrite)
