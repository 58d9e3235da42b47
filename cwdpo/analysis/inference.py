"""Inference for paired per-seed comparisons with few seeds (n ≈ 5).

Why not the percentile bootstrap alone: with n = 5 seeds it under-covers (about 83% for a
nominal 95% interval in simulation), because resampling 5 values cannot show the spread the
mean really has. The functions here are the small-sample tools the report prints instead: the
t-interval and t-test, an exact sign-flip permutation test (no normality assumption), Holm's
correction across the whole table, the minimum detectable effect a paired t-test has at the
observed spread, and the exact McNemar test for per-caption binary outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats


def _clean(diffs: Sequence[float]) -> np.ndarray:
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"paired differences must be a flat sequence, got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError(f"paired differences contain NaN: {d.tolist()}")
    return d


def paired_t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """mean ± t_{n−1,(1+level)/2} · sd/√n (sd with ddof=1): the interval that has its nominal
    coverage for normal per-seed differences at any n, unlike the bootstrap at n = 5.
    n < 2 → (nan, nan) (no spread to estimate); sd = 0 → (mean, mean)."""
    if not 0 < level < 1:
        raise ValueError(f"paired_t_interval: level must be in (0, 1), got {level}")
    d = _clean(diffs)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return mean, mean
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired_t_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided one-sample t-test p for mean 0 (the paired t-test on per-seed A − B): the test
    matching `paired_t_interval`. nan for n < 2; sd = 0 → 1.0 if the mean is 0, else 0.0 (every
    seed moved by the same nonzero amount)."""
    d = _clean(diffs)
    n = len(d)
    if n < 2:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def sign_flip_pvalue(
    diffs: Sequence[float], exact_max: int = 16, n_mc: int = 100_000, seed: int = 0
) -> float:
    """Two-sided sign-flip permutation test of mean 0: under H0 (A and B exchangeable within a
    seed) each difference's sign is a fair coin, so p = share of the 2^n sign vectors whose
    |mean| ≥ |observed mean| (− 1e-12 for float ties). No normality assumption, unlike the t-test.
    Enumerated exactly for n ≤ `exact_max`, else `n_mc` Monte Carlo flips with a fixed seed.

    Its floor: the observed signs and their mirror image always count, so p ≥ 2/2^n = 2^(1−n);
    with n = 5 the smallest possible p is 2/32 = 0.0625, so it can never reach 0.05. nan for n = 0.
    """
    d = _clean(diffs)
    n = len(d)
    if n == 0:
        return math.nan
    obs = abs(float(d.mean())) - 1e-12
    if n <= exact_max:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        means = np.abs(((1 - 2 * bits) * d).mean(axis=1))
        return float((means >= obs).mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_mc:  # in chunks: n_mc × n signs at once may not fit in memory
        k = min(10_000, n_mc - done)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(k, n))
        hits += int((np.abs((signs * d).mean(axis=1)) >= obs).sum())
        done += k
    return hits / n_mc


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values: the i-th smallest of m is multiplied by
    (m − i + 1), made monotone (running max) and capped at 1. Controls the family-wise error over
    all the tests without assuming independence; less conservative than Bonferroni. NaN entries
    (no test) are passed through and not counted in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    if len(idx) == 0:
        return out.tolist()
    if ((p[idx] < 0) | (p[idx] > 1)).any():
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out.tolist()


def _paired_t_power(effect: float, n: int, alpha: float) -> float:
    """Exact power of the two-sided paired t-test at standardized effect δ/sd (noncentral t)."""
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = effect * math.sqrt(n)
    # P(T < −crit) as P(T' > crit) with T' ~ nct(df, −nc): the same number by symmetry, but
    # scipy's nct.cdf far in the lower tail returns NaN for large nc where sf gives 0
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def mde_paired_t(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t-test: the smallest δ at which its power,
    computed exactly with the noncentral t (df = n − 1, nc = δ√n/sd: P(T > t_crit) +
    P(T < −t_crit)), reaches `power`. Why: at n = 5 a non-significant difference says little
    unless it is compared with the effect the design could have seen. n < 2 or sd nan → nan;
    sd = 0 → 0 (any effect is detected)."""
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise ValueError(f"mde_paired_t needs 0 < alpha < power < 1, got {alpha=}, {power=}")
    if n < 2 or sd is None or math.isnan(sd):
        return math.nan
    if sd < 0:
        raise ValueError(f"mde_paired_t: sd must be ≥ 0, got {sd}")
    if sd == 0:
        return 0.0
    hi = 1.0
    while _paired_t_power(hi, n, alpha) < power:  # power → 1 as the effect grows
        hi *= 2
    effect = optimize.brentq(
        lambda e: _paired_t_power(e, n, alpha) - power, 0.0, hi, xtol=1e-12, rtol=1e-12
    )
    return float(effect * sd)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p on paired binary outcomes: b pairs discordant one way, c the
    other; under H0 each discordant pair goes either way with probability 1/2, so
    p = min(1, 2 · P(X ≤ min(b, c))), X ~ Bin(b + c, 1/2). Concordant pairs carry no information.
    b + c = 0 → 1.0."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"mcnemar_exact needs non-negative integer counts, got b={b}, c={c}")
    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))
