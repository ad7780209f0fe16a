"""Is the finetuned model better than the one being served? A paired comparison on the same held-out spans,
with a confidence level.

    decision = decide(before_scores, after_scores, DecisionConfig())   # per-span scores, paired by index
    decision.better, decision.reason, decision.report()

Each span was answered by both models, so the evidence is the per-span difference after - before, for two
measures: edit similarity (in [0, 1]) and exact match (0 or 1). For each measure:

    interval     a paired bootstrap of the mean difference: `resamples` times, draw n spans with replacement
                 (the same draw for both models: that is what makes it paired), take the mean difference;
                 the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles. The draws
                 come from numpy's PCG64 seeded with `seed`, so a decision can be reproduced.
    sign test    exact matches only: of the spans where one model matched and the other did not, how many
                 went each way, and the two-sided exact binomial p-value of that split under "no difference".

The rule (`decide`):

    better       the lower bound of edit similarity's interval is above `min_improvement`
                 and no measure regressed significantly;
    regressed    a measure whose whole interval is below 0 (for exact match: also a sign test that says worse
                 at the same level), which refuses the new weights whatever the other measure did.

A finetune that changes nothing gives identical answers: every difference is 0, every interval is [0, 0], and
0 is not above a positive margin, so it is "not better" at any seed. With a margin of 0 a positive lower bound
is still needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .train_error import TrainError


@dataclass(frozen=True)
class DecisionConfig:
    min_improvement: float = 0.01  # edit similarity: the interval's lower bound must be above this
    confidence: float = 0.95  # two-sided level of every interval and of the sign test
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.min_improvement, (int, float)) or not 0 <= self.min_improvement < 1:
            raise TrainError(f"min_improvement must be in [0, 1) (a difference of mean edit similarity), "
                             f"got {self.min_improvement!r}")
        if not isinstance(self.confidence, float) or not 0.5 <= self.confidence < 1:
            raise TrainError(f"confidence must be a float in [0.5, 1), got {self.confidence!r}")
        if not isinstance(self.resamples, int) or isinstance(self.resamples, bool) or self.resamples < 100:
            raise TrainError(f"resamples must be an integer >= 100, got {self.resamples!r}")


@dataclass(frozen=True)
class Interval:
    measure: str  # "edit similarity" | "exact match"
    before: float  # mean over the spans
    after: float
    low: float  # bootstrap interval of mean(after - before)
    high: float

    @property
    def difference(self) -> float:
        return self.after - self.before

    def describe(self, confidence: float) -> str:
        return (f"{self.measure}: {self.before:.3f} -> {self.after:.3f}, difference {self.difference:+.3f}, "
                f"{confidence:.0%} interval [{self.low:+.3f}, {self.high:+.3f}]")


@dataclass(frozen=True)
class SignTest:
    wins: int  # spans matched exactly after but not before
    losses: int  # matched before but not after
    p_value: float  # two-sided exact binomial test of wins vs losses at 1/2

    def describe(self) -> str:
        return f"exact-match sign test: {self.wins} spans gained, {self.losses} lost, p = {self.p_value:.3g}"


@dataclass(frozen=True)
class Decision:
    n: int
    similarity: Interval
    exact: Interval
    sign: SignTest
    config: DecisionConfig
    better: bool
    reason: str

    def report(self) -> str:
        c = self.config
        verdict = "the new weights are better" if self.better else \
            "the new weights are not better; keep serving the old ones"
        return "\n".join([f"paired comparison on {self.n} spans ({c.resamples} bootstrap resamples, seed {c.seed}):",
                          "  " + self.similarity.describe(c.confidence), "  " + self.exact.describe(c.confidence),
                          "  " + self.sign.describe(), f"decision: {verdict}", f"  because {self.reason}"])


def bootstrap_interval(differences: np.ndarray, config: DecisionConfig) -> tuple[float, float]:
    """Percentile interval of the mean of `differences` (one value per span) over paired resamples."""
    n = len(differences)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    means = np.empty(config.resamples)
    chunk = max(1, 4_000_000 // n)  # resamples drawn at once: at most ~32 MB of int64 indices
    for start in range(0, config.resamples, chunk):
        k = min(chunk, config.resamples - start)
        means[start:start + k] = differences[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - config.confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def sign_test(before: Sequence[bool], after: Sequence[bool]) -> SignTest:
    wins = sum(1 for b, a in zip(before, after) if a and not b)
    losses = sum(1 for b, a in zip(before, after) if b and not a)
    m = wins + losses
    if m == 0:
        return SignTest(0, 0, 1.0)
    k = min(wins, losses)  # P(X <= k) + P(X >= m - k) for X ~ Binomial(m, 1/2)
    p = 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return SignTest(wins, losses, min(1.0, p))


def _interval(measure: str, before: np.ndarray, after: np.ndarray, config: DecisionConfig) -> Interval:
    low, high = bootstrap_interval(after - before, config)
    return Interval(measure, float(before.mean()), float(after.mean()), low, high)


def decide(before_similarity: Sequence[float], after_similarity: Sequence[float], before_exact: Sequence[bool],
           after_exact: Sequence[bool], config: DecisionConfig = DecisionConfig()) -> Decision:
    """The rule of the module docstring over per-span scores, paired by index."""
    n = len(before_similarity)
    if n == 0 or any(len(s) != n for s in (after_similarity, before_exact, after_exact)):
        raise TrainError(f"a paired comparison needs the same non-zero number of spans on both sides, got "
                         f"{n}, {len(after_similarity)} similarities and {len(before_exact)}, {len(after_exact)} "
                         f"exact matches")
    sim = _interval("edit similarity", np.asarray(before_similarity, float), np.asarray(after_similarity, float),
                    config)
    exact = _interval("exact match", np.asarray(before_exact, float), np.asarray(after_exact, float), config)
    sign = sign_test(before_exact, after_exact)
    alpha = 1 - config.confidence
    regressions = []
    if sim.high < 0:
        regressions.append(f"edit similarity got worse (interval [{sim.low:+.3f}, {sim.high:+.3f}] is below 0)")
    if exact.high < 0 or (sign.losses > sign.wins and sign.p_value < alpha):
        regressions.append(f"exact match got worse ({sign.losses} spans lost, {sign.wins} gained, "
                           f"p = {sign.p_value:.3g}; interval [{exact.low:+.3f}, {exact.high:+.3f}])")
    if regressions:
        return Decision(n, sim, exact, sign, config, False, "; ".join(regressions))
    if sim.low > config.min_improvement:
        return Decision(n, sim, exact, sign, config, True,
                        f"edit similarity's lower bound {sim.low:+.3f} is above the margin "
                        f"{config.min_improvement} and no measure got significantly worse")
    return Decision(n, sim, exact, sign, config, False,
                    f"edit similarity's lower bound {sim.low:+.3f} is not above the margin {config.min_improvement} "
                    f"(--min-improvement): the difference could be noise at {config.confidence:.0%} confidence")
