"""Shared test helpers: a deterministic test tokenizer and cached tiny MODEL_DIRs.

    from helpers import make_tiny_model_dir, train_test_tokenizer

    @pytest.fixture(scope="session")
    def tiny_dir(tmp_path_factory):
        return make_tiny_model_dir(tmp_path_factory)            # or make_tiny_model_dir(tmp_path_factory, "tiny-gqa")

Directories are built once per (preset, seed, vocab_size) per test session and must be treated as read-only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from codefill.model.tiny import build_tiny_model_dir
from codefill.model.tokenizer_training import train_sentencepiece

# Fixed training text for the golden-token tests: it lives here, not in the stdlib, so the pinned id lists
# depend only on the sentencepiece version.
FIXED_CORPUS = '''\
import os
import sys
from typing import Any, Dict, List, Optional


class Point:
    """A point in the plane."""

    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"

    def distance(self, other: "Point") -> float:
        dx = self.x - other.x
        dy = self.y - other.y
        return (dx * dx + dy * dy) ** 0.5


def read_lines(path: str) -> List[str]:
    with open(path, "r", encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


def count_words(lines: List[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for line in lines:
        for word in line.split():
            counts[word] = counts.get(word, 0) + 1
    return counts


def fibonacci(n: int) -> int:
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def find(items: List[Any], target: Any) -> Optional[int]:
    for index, item in enumerate(items):
        if item == target:
            return index
    return None


def remove_non_ascii(s: str) -> str:
    """Remove non-ASCII characters from a string."""
    result = ""
    for c in s:
        if ord(c) < 128:
            result += c
    return result


def main(argv: List[str]) -> int:
    if len(argv) < 2:
        print("usage: words FILE", file=sys.stderr)
        return 2
    path = argv[1]
    if not os.path.exists(path):
        print(f"no such file: {path}", file=sys.stderr)
        return 1
    counts = count_words(read_lines(path))
    for word, count in sorted(counts.items(), key=lambda kv: -kv[1])[:10]:
        print(f"{count:6d} {word}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''

TEST_VOCAB_SIZE = 600


def train_test_tokenizer(out_path: str | Path, vocab_size: int = TEST_VOCAB_SIZE) -> Path:
    """The golden tests' tokenizer: FIXED_CORPUS, Code Llama options, deterministic."""
    return train_sentencepiece(FIXED_CORPUS, out_path, vocab_size)


_built: dict[tuple[str, int, int], Path] = {}


def make_tiny_model_dir(where, preset: str = "tiny-test", seed: int = 0, vocab_size: int = 512) -> Path:
    """A tiny untrained MODEL_DIR; `where` is pytest's tmp_path_factory (cached per session) or a directory."""
    key = (preset, seed, vocab_size)
    if hasattr(where, "mktemp"):
        if key in _built and _built[key].is_dir():
            return _built[key]
        out = where.mktemp(f"tiny-{preset}-{seed}") / "model"
        _built[key] = build_tiny_model_dir(out, preset, seed, vocab_size)
        return _built[key]
    return build_tiny_model_dir(Path(where) / f"tiny-{preset}-{seed}", preset, seed, vocab_size)


def run_codefill(*args, check: bool = True, timeout: float = 600, cwd=None):
    """`codefill ARGS...` in a subprocess (in `cwd`), as a user runs it; AssertionError with its output if it
    fails and `check` is set."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "codefill.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"codefill {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
    return done


def read_png(path):
    """The RGB pixels of a PNG file (asserting that it is one)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def assert_drawn(img, min_width: int = 400) -> None:
    """A chart, not a blank or one-colour image: many colours (lines, text, antialiasing) and dark pixels."""
    import numpy as np

    h, w, _ = img.shape
    assert w >= min_width and h >= 200, img.shape
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    assert (img < 128).all(axis=2).mean() > 0.002  # axes, tick labels, title


# --- byte-level BPE families (Qwen2.5-Coder, DeepSeek-Coder): tokenizers and Hugging Face checkpoints ---------

# The special tokens each family's published tokenizer.json carries (a subset, in their published order).
FAMILY_SPECIALS = {
    "qwen2.5-coder": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                      "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
    "deepseek-coder": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
                       "<｜fim▁end｜>", "<|EOT|>"],
}


def train_bpe_tokenizer(family: str, out_path: str | Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json trained on FIXED_CORPUS with the family's special tokens, built with the
    `tokenizers` library as the published ones are (ByteLevel pre-tokenizer without a prefix space,
    ByteLevel decoder); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=FAMILY_SPECIALS[family],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([FIXED_CORPUS], trainer)
    tok.save(str(out_path))
    return Path(out_path)


def family_hf_config(family: str, vocab_size: int, **overrides) -> dict:
    """A tiny Hugging Face config.json dict shaped like the family's published ones: Qwen2.5-Coder 0.5B
    (GQA, q/k/v biases, tied embeddings, rope theta 1e6) or DeepSeek-Coder (Llama, linear rope scaling 4)."""
    if family == "qwen2.5-coder":
        cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
               "intermediate_size": 172, "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
               "max_position_embeddings": 512, "hidden_act": "silu", "tie_word_embeddings": True,
               "use_sliding_window": False, "sliding_window": 512, "max_window_layers": 2, "rope_scaling": None}
    else:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
               "intermediate_size": 172, "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 1e5,
               "max_position_embeddings": 512, "hidden_act": "silu", "tie_word_embeddings": False,
               "rope_scaling": {"type": "linear", "factor": 4.0}, "attention_bias": False, "mlp_bias": False}
    return {**cfg, **overrides}


def make_family_hf_dir(out_dir: str | Path, family: str, seed: int = 0, vocab_size: int = 512, **overrides) -> Path:
    """A random-weight Hugging Face checkpoint of the family (transformers' own Qwen2ForCausalLM or
    LlamaForCausalLM, saved with save_pretrained) plus a tokenizer.json trained here. Weights are drawn wider
    than the default init (std 0.15, norms and biases away from 0/1) so logits spread and every tensor counts."""
    import json

    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = train_bpe_tokenizer(family, out_dir / "tokenizer.json")
    n_tokens = len(json.loads(tok_path.read_text())["model"]["vocab"])
    assert n_tokens <= vocab_size, (n_tokens, vocab_size)  # the checkpoint pads the vocabulary, as Qwen's does
    hf_cfg = family_hf_config(family, vocab_size, **overrides)
    cls = transformers.Qwen2ForCausalLM if hf_cfg["model_type"] == "qwen2" else transformers.LlamaForCausalLM
    config_cls = transformers.Qwen2Config if hf_cfg["model_type"] == "qwen2" else transformers.LlamaConfig
    torch.manual_seed(seed)
    model = cls(config_cls(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return out_dir


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may linger if the container's init does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def processes_with(token: str) -> list[int]:
    """Pids (as seen here, outside any namespace) of running processes whose command line holds `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read() and alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def all_gone(token: str, within_s: float = 3.0) -> bool:
    """No process holding `token` within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not processes_with(token):
            return True
        time.sleep(0.05)
    return False
