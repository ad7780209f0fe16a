"""The refresh decision's statistics on synthetic paired scores: checked against scipy's binomial test and
bootstrap, and over many seeds for the rates that matter (a finetune that changes nothing or only adds noise
is almost never "better"; a real improvement almost always is; a regression is refused)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from codefill.training.paired_decision import DecisionConfig, bootstrap_interval, decide, sign_test
from codefill.training.train_error import TrainError


def synthetic(n: int, shift: float, noise: float, seed: int, exact_shift: float = 0.0):
    """Per-span before/after scores: before ~ U(0.2, 0.8); after = before + shift + N(0, noise), clipped to
    [0, 1]; exact matches where the similarity is above 0.75 (so they move with it), flipped by exact_shift."""
    rng = np.random.default_rng(seed)
    before = rng.uniform(0.2, 0.8, n)
    after = np.clip(before + shift + rng.normal(0, noise, n), 0, 1)
    be, ae = before > 0.75, after > 0.75
    if exact_shift < 0:  # lose some of the matches
        ae = ae & (rng.uniform(size=n) > -exact_shift * 10)
    return before, after, be, ae


def test_sign_test_matches_scipy_binomtest():
    for wins, losses in ((0, 0), (3, 0), (0, 7), (5, 5), (12, 4), (1, 20), (30, 41)):
        before = [True] * losses + [False] * wins + [True, False] * 3  # ties count for nothing
        after = [False] * losses + [True] * wins + [True, False] * 3
        got = sign_test(before, after)
        assert (got.wins, got.losses) == (wins, losses)
        expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert got.p_value == pytest.approx(expected, rel=1e-9), (wins, losses)


def test_bootstrap_interval_agrees_with_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(3)
    d = rng.normal(0.04, 0.2, 400)
    cfg = DecisionConfig(resamples=4000, seed=1)
    low, high = bootstrap_interval(d, cfg)
    ref = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    for a, b in ((low, ref.low), (high, ref.high), (low, d.mean() - half), (high, d.mean() + half)):
        assert a == pytest.approx(b, abs=0.004)
    assert bootstrap_interval(d, cfg) == (low, high)  # seeded: reproducible
    assert bootstrap_interval(d, DecisionConfig(resamples=4000, seed=2)) != (low, high)


def test_identical_answers_are_never_better_at_any_seed():
    for seed in range(50):
        before, _, be, _ = synthetic(300, 0, 0, seed)
        for margin in (0.0, 0.01):
            d = decide(before, before, be, be, DecisionConfig(min_improvement=margin, resamples=200, seed=seed))
            assert not d.better and d.similarity.low == d.similarity.high == 0.0, d.report()
            assert "not above the margin" in d.reason


def test_noise_alone_is_rarely_better():
    """after = before + zero-mean noise: 'better' would be a false positive. At a margin of 0 the rate is
    about (1 - confidence) / 2 = 2.5%; at the default margin it is (almost) never."""
    trials = 200
    zero_margin = default = 0
    for seed in range(trials):
        before, after, be, ae = synthetic(200, 0.0, 0.15, seed)
        zero_margin += decide(before, after, be, ae, DecisionConfig(min_improvement=0.0, resamples=500,
                                                                    seed=seed)).better
        default += decide(before, after, be, ae, DecisionConfig(resamples=500, seed=seed)).better
    assert zero_margin <= 0.06 * trials, zero_margin
    assert default <= 0.01 * trials, default


def test_a_real_improvement_is_better_nearly_always():
    better = 0
    for seed in range(100):
        before, after, be, ae = synthetic(300, 0.06, 0.15, seed)
        d = decide(before, after, be, ae, DecisionConfig(resamples=500, seed=seed))
        better += d.better
        if d.better:
            assert d.similarity.low > 0.01 and "above the margin" in d.reason
    assert better >= 95, better


def test_a_regression_is_refused_with_its_numbers():
    before, after, be, ae = synthetic(300, -0.05, 0.1, 0)
    d = decide(before, after, be, ae)
    assert not d.better and "edit similarity got worse" in d.reason and d.similarity.high < 0
    text = d.report()
    assert "paired comparison on 300 spans" in text and "95% interval [" in text
    assert "decision: the new weights are not better" in text and "because edit similarity got worse" in text


def test_exact_matches_lost_refuse_even_when_similarity_rises():
    n = 300
    before = np.full(n, 0.5)
    after = before + 0.1  # every span a little closer...
    be = np.arange(n) < 60  # ...but 40 of the 60 exact matches lost
    ae = np.arange(n) < 20
    after[:60] = 0.95
    before[:60] = 1.0
    d = decide(before, after, be, ae)
    assert d.similarity.low > 0.01  # would pass on similarity alone
    assert not d.better and "exact match got worse (40 spans lost, 0 gained" in d.reason


def test_bad_input_is_refused_with_its_values():
    with pytest.raises(TrainError, match="same non-zero number of spans.*3, 2"):
        decide([0.1, 0.2, 0.3], [0.1, 0.2], [False] * 3, [False] * 3)
    with pytest.raises(TrainError, match="same non-zero number"):
        decide([], [], [], [])
    with pytest.raises(TrainError, match="min_improvement must be in \\[0, 1\\).*-0.1"):
        DecisionConfig(min_improvement=-0.1)
    with pytest.raises(TrainError, match="confidence .* got 95"):
        DecisionConfig(confidence=95)
    with pytest.raises(TrainError, match="resamples .* got 10"):
        DecisionConfig(resamples=10)
