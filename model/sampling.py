"""Choosing the next token from last-position logits, on the host in numpy.

Temperature 0 is greedy (argmax, ties to the lowest id). Otherwise logits are divided by the temperature, cut
to the `top_k` largest (0 = all), then to the smallest set of most likely tokens whose probability reaches
`top_p` (1.0 = all; the most likely token always survives), and one token is drawn. The draw comes from a
`numpy.random.Generator` seeded with `seed` per request, so the same prompt and config give the same tokens.

The log-prob reported with a token is under the unmodified softmax of the model's logits, whatever the
temperature and cuts, so a client can compare completions sampled in different ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from codefill.errors import CodefillError


class SamplingError(CodefillError, ValueError):
    """An invalid sampling setting; the message names it and its value."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no cut
    top_p: float = 1.0  # 1.0 = no cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[V] -> [V] in float64, stable for large logits."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def without(logits: np.ndarray, ids) -> np.ndarray:
    """A copy of `logits` in which none of `ids` (those inside the vocabulary) can be chosen."""
    out = logits.copy()
    out[[t for t in ids if 0 <= t < len(out)]] = -np.inf
    return out


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None = None) -> int:
    """One token id from last-position logits [V]. `rng` is required unless cfg is greedy."""
    if logits.ndim != 1:
        raise SamplingError(f"sample takes logits of one position [V], got shape {logits.shape}")
    if cfg.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise SamplingError(f"temperature {cfg.temperature} samples and needs an rng (cfg.rng())")
    x = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-x, kind="stable")  # most likely first; ties keep the lower id first
    if cfg.top_k:
        order = order[: cfg.top_k]
    x = x[order]
    probs = np.exp(x - x[0])
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        # Keep tokens while the mass *before* them is below top_p: the smallest prefix reaching top_p.
        before = np.cumsum(probs) - probs
        keep = before < cfg.top_p
        order, probs = order[keep], probs[keep]
        probs /= probs.sum()
    return int(order[rng.choice(len(order), p=probs)])
