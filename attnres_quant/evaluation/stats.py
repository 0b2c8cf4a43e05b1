"""Statistics of per-sample scores: standard errors, flips, paired deltas with confidence intervals.

All functions take per-sample scores aligned by sample (same docs, same order) as produced by
:func:`attnres_quant.evaluation.evaluate` (``TaskResult.per_sample``); binary outcomes are 0/1
floats (a value >= 0.5 counts as correct).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(n) (lm-eval's ``mean_stderr``).

    For 0/1 outcomes this is sqrt(p(1-p) n/(n-1)) / sqrt(n). NaN for n < 2.
    """
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def _check(base: Sequence[float], var: Sequence[float]) -> None:
    if len(base) != len(var):
        raise ValueError(f"paired samples differ in length: {len(base)} vs {len(var)}")


def flips(base: Sequence[float], var: Sequence[float]) -> tuple[int, int]:
    """(correct -> wrong, wrong -> correct) counts between baseline and variant."""
    _check(base, var)
    c2w = sum(1 for b, v in zip(base, var) if b >= 0.5 and v < 0.5)
    w2c = sum(1 for b, v in zip(base, var) if b < 0.5 and v >= 0.5)
    return c2w, w2c


def paired_delta(base: Sequence[float], var: Sequence[float], *, iters: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(delta, lo, hi): mean(var) - mean(base) with a paired-bootstrap (1-alpha) percentile interval.

    Resamples documents (with replacement) and recomputes the mean paired difference; the seed is
    fixed so the interval is reproducible. Empty input gives NaNs.
    """
    _check(base, var)
    n = len(base)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    diffs = [v - b for b, v in zip(base, var)]
    delta = sum(diffs) / n
    if all(d == diffs[0] for d in diffs):
        return delta, delta, delta
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, iters, chunk):
        m = min(chunk, iters - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    lo, hi = (float(x) for x in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    return delta, lo, hi


def mcnemar(base: Sequence[float], var: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes (binomial test on the flips)."""
    c2w, w2c = flips(base, var)
    k, n = min(c2w, w2c), c2w + w2c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(base: Sequence[float], var: Sequence[float], *, iters: int = 2000, seed: int = 0) -> dict:
    """Everything about one paired comparison, JSON-ready."""
    delta, lo, hi = paired_delta(base, var, iters=iters, seed=seed)
    c2w, w2c = flips(base, var)
    return {"n": len(base), "delta": delta, "ci_lo": lo, "ci_hi": hi, "correct_to_wrong": c2w,
            "wrong_to_correct": w2c, "mcnemar_p": mcnemar(base, var)}
