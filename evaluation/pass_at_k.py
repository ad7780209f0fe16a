"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

For one problem, n samples were drawn and c of them passed. pass@k is the probability that at least one of k
samples, drawn without replacement from those n, passes:

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomials overflow floats for large n, so, as in the paper's code, the ratio is computed as a product of
c factors, each in [0, 1):

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

When n - c < k every k-subset holds a passing sample and pass@k is exactly 1. The benchmark score is the mean
over problems (every problem with the same n in practice, though the estimator does not need that).
"""

from __future__ import annotations

from collections.abc import Sequence

from .eval_error import EvalError


def _check_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise EvalError(f"pass@k: {name} must be a non-negative integer, got {v!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c passed; needs 1 <= k <= n and c <= n."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        _check_int(name, v)
    if k < 1 or k > n:
        raise EvalError(f"pass@k: k must be in [1, n] = [1, {n}], got k={k}")
    if c > n:
        raise EvalError(f"pass@k: c={c} passing samples is more than n={n} samples")
    if n - c < k:
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


def mean_pass_at_k(pairs: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs."""
    if not pairs:
        raise EvalError(f"pass@{k}: no problems to average over")
    return sum(pass_at_k(n, c, k) for n, c in pairs) / len(pairs)
