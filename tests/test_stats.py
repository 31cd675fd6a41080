"""Paired statistics: McNemar's test against textbook values and naive references, the paired
bootstrap against a per-index bootstrap, mean ± std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seed_core.evaluation.stats import (binomial_tail, chi2_sf_1df, compare_paired, mcnemar,
                                        paired_bootstrap_ci, seed_spread)


def pairs(a_only: int, b_only: int, both: int = 0, neither: int = 0,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with the given cell counts, shuffled."""
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def naive_binomial_tail(k: int, n: int) -> float:
    """P(X >= k), X ~ Bin(n, 1/2), from the pmf term by term in floats."""
    return sum(math.factorial(n) / (math.factorial(i) * math.factorial(n - i)) * 0.5 ** n
               for i in range(k, n + 1))


def naive_normal_sf(z: float, steps: int = 20000) -> float:
    """1 - Phi(z) by Simpson's rule on the normal density over [z, z + 12]."""
    h = 12.0 / steps
    f = [math.exp(-0.5 * (z + i * h) ** 2) / math.sqrt(2 * math.pi) for i in range(steps + 1)]
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_chi2_sf_matches_textbook_critical_values() -> None:
    assert chi2_sf_1df(3.841458820694124) == pytest.approx(0.05, abs=1e-12)
    assert chi2_sf_1df(6.634896601021214) == pytest.approx(0.01, abs=1e-12)
    assert chi2_sf_1df(0.0) == 1.0
    for x in (0.5, 2.0, 10.0, 25.0):  # chi-square(1) = Z^2: sf(x) = 2 (1 - Phi(sqrt x))
        assert chi2_sf_1df(x) == pytest.approx(2 * naive_normal_sf(math.sqrt(x)), rel=1e-6)


@pytest.mark.parametrize("k,n", [(0, 5), (3, 5), (9, 10), (10, 10), (11, 10), (30, 49)])
def test_binomial_tail_matches_the_pmf(k: int, n: int) -> None:
    assert binomial_tail(k, n) == pytest.approx(naive_binomial_tail(k, n), rel=1e-12, abs=0)


def test_mcnemar_exact_textbook_sign_test() -> None:
    # 9 of 10 discordant pairs favour A: two-sided p = 2 (1 + 10) / 2^10
    result = mcnemar(*pairs(9, 1, both=50, neither=7))
    assert (result.a_only, result.b_only, result.method) == (9, 1, "exact")
    assert result.p_value == pytest.approx(22 / 1024, rel=1e-12)
    one_sided = mcnemar(*pairs(9, 1), alternative="greater")
    assert one_sided.p_value == pytest.approx(11 / 1024, rel=1e-12)
    # the other direction is not evidence for A
    assert mcnemar(*pairs(1, 9), alternative="greater").p_value == pytest.approx(1 - 1 / 1024)
    # symmetric and no discordance: p = 1
    assert mcnemar(*pairs(5, 5)).p_value == 1.0
    assert mcnemar(*pairs(0, 0, both=3)).p_value == 1.0


def test_mcnemar_chi2_textbook_example() -> None:
    # Wikipedia's McNemar example: b = 121, c = 59; with Edwards' continuity correction
    # chi2 = (|121 - 59| - 1)^2 / 180 = 20.672
    result = mcnemar(*pairs(121, 59, both=101, neither=33))
    assert result.method == "chi2"
    assert result.statistic == pytest.approx(3721 / 180, rel=1e-12)
    assert result.p_value == pytest.approx(2 * naive_normal_sf(math.sqrt(3721 / 180)), rel=1e-5)
    assert result.p_value < 1e-5
    # one-sided normal approximation with the same continuity correction
    greater = mcnemar(*pairs(121, 59), alternative="greater")
    assert greater.p_value == pytest.approx(naive_normal_sf((121 - 59 - 1) / math.sqrt(180)),
                                            rel=1e-5)


def test_mcnemar_switches_to_chi2_at_the_threshold_and_they_agree_there() -> None:
    exact = mcnemar(*pairs(33, 16), exact_below=50)
    approx = mcnemar(*pairs(33, 17), exact_below=50)
    assert exact.method == "exact" and approx.method == "chi2"
    assert exact.p_value == pytest.approx(2 * naive_binomial_tail(33, 49), rel=1e-9)
    # near 50 discordant pairs the corrected chi-square is close to the exact binomial
    assert mcnemar(*pairs(33, 17), exact_below=51).p_value == pytest.approx(approx.p_value,
                                                                             rel=0.15)


def test_mcnemar_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same samples: 3 vs 2"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"correct_a must hold booleans or 0/1, got values "
                                         r"\[0, 2\]"):
        mcnemar([0, 2], [1, 1])
    with pytest.raises(ValueError, match="alternative"):
        mcnemar([1], [0], alternative="less")


def naive_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Resample image indices with replacement, one resample at a time."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        rows = rng.integers(0, a.size, a.size)
        diffs.append(100.0 * (a[rows].mean() - b[rows].mean()))
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return float(low), float(high)


def test_paired_bootstrap_matches_index_resampling() -> None:
    a, b = pairs(100, 60, both=700, neither=140)  # n = 1000, A ahead by 4 points
    fast = paired_bootstrap_ci(a, b, resamples=4000, seed=1)
    slow = naive_bootstrap(a, b, resamples=4000, seed=2)
    # same distribution, different draws: the percentiles agree to Monte-Carlo error (~0.06)
    assert fast == pytest.approx(slow, abs=0.3)
    # and both match the normal approximation of the paired difference
    d = np.where(a & ~b, 1.0, 0.0) - np.where(~a & b, 1.0, 0.0)
    se = 100 * d.std() / math.sqrt(d.size)
    assert fast == pytest.approx((4.0 - 1.96 * se, 4.0 + 1.96 * se), abs=0.35)


def test_paired_bootstrap_is_seeded_and_respects_confidence() -> None:
    a, b = pairs(40, 25, both=300, neither=35)
    assert paired_bootstrap_ci(a, b, seed=3) == paired_bootstrap_ci(a, b, seed=3)
    wide = paired_bootstrap_ci(a, b, confidence=0.99, seed=3)
    narrow = paired_bootstrap_ci(a, b, confidence=0.8, seed=3)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert paired_bootstrap_ci(*pairs(0, 0, both=10)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_bootstrap_ci(a, b, confidence=95)


def test_paired_test_beats_the_unpaired_two_standard_errors() -> None:
    """Two models that differ on few images: significant by the paired test, although the
    difference is well inside two standard errors of one accuracy (the old report's noise)."""
    a, b = pairs(30, 5, both=7500, neither=2465)  # 10,000 images, +0.25 points
    result = compare_paired(a, b)
    one_accuracy_noise = 200 * math.sqrt(0.75 * 0.25 / a.size)  # ~0.87 points
    assert result.difference == pytest.approx(0.25)
    assert result.difference < one_accuracy_noise
    assert result.p_value < 1e-3 and result.significant
    assert 0.0 < result.ci_low < 0.25 < result.ci_high
    assert result.to_dict()["significant"] is True and result.samples == 10_000


def test_seed_spread() -> None:
    spread = seed_spread([79.1, 79.5, 78.9])
    assert spread.mean == pytest.approx(79.1666666667)
    assert spread.std == pytest.approx(math.sqrt(((79.1 - 79.1666666667) ** 2
                                                  + (79.5 - 79.1666666667) ** 2
                                                  + (78.9 - 79.1666666667) ** 2) / 2))
    assert seed_spread([80.0]).std is None and seed_spread([80.0]).n == 1
    with pytest.raises(ValueError, match="non-empty list"):
        seed_spread([])
    with pytest.raises(ValueError, match="finite"):
        seed_spread([1.0, float("nan")])
