"""Statistics for comparing models on the same test images (pure functions, numpy / math only).

Two accuracies measured on the same images are correlated: the noise of their difference comes
from the images the two models disagree on, not from two standard errors of one accuracy. So a
comparison is paired: McNemar's test on the discordant pairs (`mcnemar`), and a paired
bootstrap confidence interval of the accuracy difference (`paired_bootstrap_ci`). Over several
seeds, `seed_spread` gives mean ± sample standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import numpy as np

# Below this many discordant pairs the chi-square approximation is poor: use the exact binomial.
EXACT_BELOW = 50
RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05  # significance level of the report's claims (two-sided)

Alternative = Literal["two-sided", "greater"]


@dataclass(frozen=True)
class McNemar:
    """McNemar's test of model A against model B on the same samples.

    `a_only`: samples only A got right; `b_only`: only B. Under H0 (equal accuracy) each
    discordant pair is A's with probability 1/2.
    """

    a_only: int
    b_only: int
    statistic: float  # chi-square with continuity correction, or a_only for the exact test
    p_value: float
    method: Literal["exact", "chi2"]
    alternative: Alternative


def _correct(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector of per-sample correctness, "
                         f"got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must hold booleans or 0/1, got values "
                             f"{np.unique(arr)[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def _paired(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _correct(correct_a, "correct_a"), _correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same samples: {a.size} vs {b.size}")
    if a.size == 0:
        raise ValueError("paired comparison of zero samples")
    return a, b


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic, one rounding)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def chi2_sf_1df(x: float) -> float:
    """Survival function of the chi-square distribution with 1 degree of freedom."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2.0))


def mcnemar(correct_a: Any, correct_b: Any, alternative: Alternative = "two-sided",
            exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test on per-sample correctness vectors `(N,)` of two models.

    With fewer than `exact_below` discordant pairs the p-value is the exact binomial one
    (two-sided: twice the smaller tail, capped at 1); otherwise the chi-square statistic with
    continuity correction, (|b - c| - 1)^2 / (b + c). `alternative="greater"` tests A better
    than B (one-sided; its normal approximation uses the same continuity correction).
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    a, b = _paired(correct_a, correct_b)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    if n < exact_below:
        if alternative == "greater":
            p = binomial_tail(a_only, n)
        else:
            p = min(1.0, 2.0 * binomial_tail(max(a_only, b_only), n))
        return McNemar(a_only, b_only, float(a_only), p, "exact", alternative)
    statistic = (abs(a_only - b_only) - 1) ** 2 / n if abs(a_only - b_only) >= 1 else 0.0
    if alternative == "greater":
        z = (a_only - b_only - 1) / math.sqrt(n)  # continuity-corrected P(X >= a_only)
        p = 0.5 * math.erfc(z / math.sqrt(2.0))
    else:
        p = chi2_sf_1df(statistic)
    return McNemar(a_only, b_only, statistic, min(1.0, p), "chi2", alternative)


def paired_bootstrap_ci(correct_a: Any, correct_b: Any, resamples: int = RESAMPLES,
                        confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(A) - accuracy(B), in points, resampling images.

    A resample of N images draws each image's pair (A right?, B right?) with replacement, so its
    difference depends only on how many drawn pairs are A-only and B-only: those counts are
    multinomial(N, (a_only / N, b_only / N, rest)). Drawing the counts is the same distribution
    as drawing N indices, at O(resamples) instead of O(resamples x N) cost.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    a, b = _paired(correct_a, correct_b)
    n = a.size
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    probs = np.array([a_only, b_only, n - a_only - b_only], dtype=np.float64) / n
    counts = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    diffs = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on the same test images (accuracies and differences in %)."""

    a_top1: float
    b_top1: float
    difference: float  # a_top1 - b_top1
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    a_only: int
    b_only: int
    p_value: float  # two-sided McNemar
    test: Literal["exact", "chi2"]
    samples: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def compare_paired(correct_a: Any, correct_b: Any, resamples: int = RESAMPLES,
                   confidence: float = CONFIDENCE, seed: int = 0) -> PairedComparison:
    """McNemar's two-sided test and the paired bootstrap interval of A - B (see both)."""
    a, b = _paired(correct_a, correct_b)
    test = mcnemar(a, b)
    low, high = paired_bootstrap_ci(a, b, resamples, confidence, seed)
    a_top1, b_top1 = 100.0 * float(a.mean()), 100.0 * float(b.mean())
    return PairedComparison(a_top1=a_top1, b_top1=b_top1, difference=a_top1 - b_top1,
                            ci_low=low, ci_high=high, confidence=confidence,
                            resamples=resamples, a_only=test.a_only, b_only=test.b_only,
                            p_value=test.p_value, test=test.method, samples=int(a.size))


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof = 1) over seeds; std is None for one seed."""

    mean: float
    std: float | None
    n: int


def seed_spread(values: Sequence[float]) -> Spread:
    """Mean ± sample standard deviation of one metric over seeds."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"need a non-empty list of per-seed values, got {list(values)!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"per-seed values must be finite numbers, got {arr.tolist()}")
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return Spread(mean=float(arr.mean()), std=std, n=int(arr.size))


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean over seeds and its 95% t-interval `(mean, low, high)`; no interval for one seed.
    With 3 seeds the half-width is 4.303 standard errors: few seeds buy a wide interval."""
    spread = seed_spread(values)
    if spread.std is None:
        return spread.mean, None, None
    df = spread.n - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.96) * spread.std / math.sqrt(spread.n)
    return spread.mean, spread.mean - half, spread.mean + half
