"""The few statistical tests drift detection needs, in NumPy (SciPy is ~100 MB in a layer; these are ~100 lines).

P-values are returned as ``log10(p)`` so that very strong evidence (p far below 1e-300) neither underflows to 0
nor turns into an infinite score. Accuracy is that of the classical asymptotic approximations (checked against
SciPy in the tests): the two-sample Kolmogorov-Smirnov distribution with Stephens' small-sample correction, and
the chi-square distribution of Pearson's statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LOG10_P_FLOOR = -300.0  # scores stay finite and comparable; 1e-300 is already beyond any real decision
KS_DIGITS = 4  # below the precision either writer keeps (see ks_2samp)
_LN10 = math.log(10.0)


def log10_kolmogorov_sf(lam: float) -> float:
    """``log10 P(K > lam)`` for the Kolmogorov distribution, ``2 sum (-1)^(j-1) exp(-2 j^2 lam^2)``."""
    if lam < 0.2:  # the sum is 1 to double precision here, and converges slowly
        return 0.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        total += sign * term
        sign = -sign
        if term < 1e-16 * total:
            break
    q = 2.0 * total
    if q > 1e-290:
        return max(LOG10_P_FLOOR, math.log10(min(q, 1.0)))
    # Far tail: the first term alone, in logs (exp underflows first).
    return max(LOG10_P_FLOOR, (math.log(2.0) - 2.0 * lam * lam) / _LN10)


def round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    """Round to ``digits`` significant digits (NaN and infinities pass through)."""
    v = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.floor(np.log10(np.abs(v)))
        scale = np.power(10.0, digits - 1 - np.where(np.isfinite(magnitude), magnitude, 0.0))
        out = np.round(v * scale) / scale
    return np.where(np.isfinite(v), out, v)


def ks_2samp(x: np.ndarray, y: np.ndarray, digits: int | None = KS_DIGITS) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test.

    Parameters
    ----------
    x, y : np.ndarray
        1-D samples; NaNs are dropped. Ties are handled exactly (the statistic is evaluated on the pooled values).
    digits : int or None
        Significant digits both samples are rounded to first. The reference and the serving container round
        their numbers differently (6 and 5 digits): unrounded, a constant such as the 4:3 aspect ratio
        (1.33333 vs 1.3333) would look like two disjoint distributions.

    Returns
    -------
    (float, float)
        The statistic ``D`` and ``log10`` of its asymptotic p-value (0.0, i.e. p = 1, when a sample is empty).
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if digits is not None:
        a, b = round_significant(a, digits), round_significant(b, digits)
    a, b = np.sort(a), np.sort(b)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return 0.0, 0.0
    pooled = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, pooled, side="right") / n -
                            np.searchsorted(b, pooled, side="right") / m)))
    ne = n * m / (n + m)
    root = math.sqrt(ne)
    return d, log10_kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def log_gammaincc(a: float, x: float) -> float:
    """Natural log of the regularised upper incomplete gamma function ``Q(a, x)`` (series / continued fraction)."""
    if x <= 0.0:
        return 0.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # Series for P(a, x); Q = 1 - P is not small here, so the subtraction loses nothing that matters.
        ap, term = a, 1.0 / a
        total = term
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        p = math.exp(log_prefactor) * total
        return math.log1p(-p) if p < 1.0 else LOG10_P_FLOOR * _LN10
    # Lentz's continued fraction for Q(a, x).
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return log_prefactor + math.log(h)


def log10_chi2_sf(statistic: float, df: int) -> float:
    """``log10 P(X > statistic)`` for a chi-square variable with ``df`` degrees of freedom."""
    if df <= 0 or statistic <= 0.0:
        return 0.0
    return max(LOG10_P_FLOOR, min(0.0, log_gammaincc(df / 2.0, statistic / 2.0) / _LN10))


def chi2_homogeneity(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, min_expected: float = 5.0
) -> tuple[float, int, float]:
    """Pearson's chi-square test that two count vectors come from the same categorical distribution.

    Categories whose expected count is under ``min_expected`` in either sample are pooled, smallest first, until
    every pooled category reaches it: the chi-square approximation overstates the evidence of sparse cells, and
    rare classes (vascular lesions, dermatofibroma) are sparse in any hour of traffic.

    Returns
    -------
    (float, int, float)
        Statistic, degrees of freedom and ``log10`` p-value (``(0, 0, 0.0)`` when fewer than two categories remain).
    """
    table = np.vstack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    rows = table.sum(axis=1)
    if table.shape[1] < 2 or np.any(rows == 0):
        return 0.0, 0, 0.0
    share = rows / rows.sum()
    cols = [table[:, j] for j in np.argsort(table.sum(axis=0))]
    # Merge the smallest category into the next smallest while any category is too sparse.
    while len(cols) > 1 and float((share * cols[0].sum()).min()) < min_expected:
        merged = cols[0] + cols[1]
        cols = sorted([merged, *cols[2:]], key=lambda c: float(c.sum()))
    if len(cols) < 2:
        return 0.0, 0, 0.0
    observed = np.stack(cols, axis=1)
    expected = np.outer(share, observed.sum(axis=0))
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = observed.shape[1] - 1
    return statistic, df, log10_chi2_sf(statistic, df)


def population_stability_index(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray,
                               eps: float = 1e-4) -> float:
    """PSI between two distributions over the same bins (fractions or counts; 0.1-0.25 moderate, > 0.25 large)."""
    pa = np.asarray(p, dtype=np.float64)
    qa = np.asarray(q, dtype=np.float64)
    pa = np.maximum(pa / max(pa.sum(), 1e-12), eps)
    qa = np.maximum(qa / max(qa.sum(), 1e-12), eps)
    return float(np.sum((qa - pa) * np.log(qa / pa)))


def bonferroni_log10(log10_ps: Sequence[float]) -> float:
    """``log10`` of the Bonferroni-adjusted minimum p-value, ``min(1, m * min p)``, of ``m`` tests."""
    if not log10_ps:
        return 0.0
    return min(0.0, math.log10(len(log10_ps)) + min(log10_ps))


def drift_score(log10_p: float, alpha: float) -> float:
    """``log10(p) / log10(alpha)``: 1.0 exactly at the significance level, 2.0 at ``alpha**2``, 0 at p = 1."""
    if log10_p >= 0.0:
        return 0.0
    return log10_p / math.log10(alpha)
