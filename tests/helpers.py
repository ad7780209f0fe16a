"""Shared test helpers: a deterministic test tokenizer and cached tiny MODEL_DIRs.

    from helpers import make_tiny_model_dir, train_test_tokenizer

    @pytest.fixture(scope="session")
    def tiny_dir(tmp_path_factory):
        return make_tiny_model_dir(tmp_path_factory)            # or make_tiny_model_dir(tmp_path_factory, "tiny-gqa")

Directories are built once per (preset, seed, vocab_size) per test session and must be treated as read-only.
"""

from __future__ import annotations

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
