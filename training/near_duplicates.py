"""Near-duplicate files by MinHash of shingles of normalised tokens, with an LSH index to find candidates.

Normalised tokens: identifiers, numbers and single punctuation characters (`\\w+|[^\\w\\s]`); comments,
whitespace and layout do not count, so a file re-indented or re-commented is still the same file. Shingles are
the runs of SHINGLE consecutive tokens, hashed with CRC-32 (stable across processes, unlike `hash`). The
signature is the minimum of PERMUTATIONS universal hashes (a*x + b mod 2^31-1) over the shingle hashes; two
files' estimated Jaccard similarity is the share of equal signature entries. The index splits a signature
into BANDS bands of ROWS rows; files sharing any band are candidates, and a candidate whose estimated
similarity is at least the threshold makes the newer file a near duplicate of the first one kept.
With 16 bands of 8 rows, a pair at Jaccard 0.85 is a candidate with probability 0.99, one at 0.5 with 0.06.

Files with fewer than SHINGLE tokens have no shingles; only exact de-duplication applies to them.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

SHINGLE = 5
BANDS, ROWS = 16, 8
PERMUTATIONS = BANDS * ROWS
_PRIME = np.uint64((1 << 31) - 1)   # a*x stays below 2^62: no overflow in uint64
_rng = np.random.default_rng(20260417)   # fixed: signatures must mean the same in every run
_A = _rng.integers(1, _PRIME, PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, PERMUTATIONS, dtype=np.uint64)
_TOKEN = re.compile(r"\w+|[^\w\s]")
_COMMENT = re.compile(r"#[^\n]*")


def normalized_tokens(text: str) -> list[str]:
    """The tokens of `text` with `#` comments removed (a `#` inside a string goes too: harmless here)."""
    return _TOKEN.findall(_COMMENT.sub("", text))


def signature(text: str) -> np.ndarray | None:
    """The MinHash signature (uint64 [PERMUTATIONS]) of the text's shingles; None when it has none."""
    tokens = normalized_tokens(text)
    if len(tokens) < SHINGLE:
        return None
    joined = [" ".join(tokens[i:i + SHINGLE]).encode() for i in range(len(tokens) - SHINGLE + 1)]
    hashes = np.unique(np.fromiter((zlib.crc32(s) for s in joined), np.uint64, len(joined)) % _PRIME)
    return ((_A * hashes[:, None] + _B) % _PRIME).min(axis=0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float((a == b).mean())


class NearDuplicateIndex:
    """Files added in order; `find` names an earlier kept file the text nearly duplicates."""

    def __init__(self, threshold: float = 0.85):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.signatures: list[np.ndarray] = []
        self.keys: list[str] = []
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]

    def find(self, sig: np.ndarray | None) -> str | None:
        """The key of a kept file at least `threshold` similar to `sig`, or None."""
        if sig is None:
            return None
        seen: set[int] = set()
        for band, bucket in enumerate(self.buckets):
            for i in bucket.get(sig[band * ROWS:(band + 1) * ROWS].tobytes(), ()):
                if i not in seen:
                    seen.add(i)
                    if similarity(sig, self.signatures[i]) >= self.threshold:
                        return self.keys[i]
        return None

    def add(self, key: str, sig: np.ndarray | None) -> None:
        if sig is None:
            return
        i = len(self.signatures)
        self.signatures.append(sig)
        self.keys.append(key)
        for band, bucket in enumerate(self.buckets):
            bucket.setdefault(sig[band * ROWS:(band + 1) * ROWS].tobytes(), []).append(i)
