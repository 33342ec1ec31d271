"""Statistics for method comparisons: a seed x case bootstrap, the equivalence test (TOST), the smallest detectable effect.

A comparison of two training methods has two sources of noise: the training seed (the same method gives
another model on another seed) and the case (a held-out skull is easy or hard for every model). The
differences we test are therefore paired twice: by seed (method A seed s against method B seed s) and by case.

* :func:`seed_case_bootstrap` resamples seeds and cases with replacement (two-level percentile bootstrap),
  so its interval widens with the seed-to-seed spread as well as the case-to-case one.
* :func:`tost` is Schuirmann's two one-sided tests on per-case differences (averaged over seeds): "the
  difference lies within +/- margin" is accepted when both one-sided nulls are rejected, i.e. when the
  (1 - 2 alpha) t-interval lies inside (-margin, margin). :func:`bootstrap_equivalence` is the same rule
  on the bootstrap's (1 - 2 alpha) interval, which carries the seed noise too.
* :func:`min_detectable_effect` is the smallest true mean difference a two-sided paired t-test detects
  with the given power (exact, through the noncentral t distribution).

Written here because scipy has the distributions but not these designs (scipy.stats.bootstrap resamples
one level only; no well-kept library offers TOST with a seed x case layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided interval [lo, hi] at the stated confidence."""

    mean: float
    lo: float
    hi: float
    confidence: float


@dataclass(frozen=True)
class Tost:
    """Schuirmann's TOST of a paired mean difference against +/- margin."""

    mean: float
    n: int
    margin: float
    p_lower: float  # H0: mean <= -margin
    p_upper: float  # H0: mean >= +margin
    ci_lo: float  # the (1 - 2 alpha) t-interval: equivalence <=> it lies inside (-margin, margin)
    ci_hi: float
    alpha: float

    @property
    def p(self) -> float:
        """The TOST p-value: the larger of the two one-sided p-values."""
        return max(self.p_lower, self.p_upper)

    @property
    def equivalent(self) -> bool:
        """True when both one-sided nulls are rejected at alpha."""
        return self.p < self.alpha


def _as_seed_case(diff: np.ndarray) -> np.ndarray:
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"differences must be a non-empty (seeds, cases) array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("differences must be finite (drop failed cases before testing)")
    return d


def seed_case_bootstrap(diff: np.ndarray, *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of the mean of ``diff[seed, case]``, resampling seeds and cases with replacement.

    Each replicate draws S seeds out of S and C cases out of C (independently) and takes the mean
    of the S x C sub-table, so both the training-seed and the case variation enter the interval.
    A 1-D array is one seed.
    """
    d = _as_seed_case(diff)
    n_seeds, n_cases = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    ci = rng.integers(0, n_cases, size=(n_boot, n_cases))
    # mean over the drawn sub-table = mean over drawn seeds of the mean over drawn cases; computed per
    # replicate as (1/S) sum_s (1/C) sum_c d[s_i, c_j] without building the (n_boot, S, C) cube.
    per_seed_case_means = d[:, ci].mean(axis=2).T  # (n_boot, n_seeds): each seed over that replicate's drawn cases
    stats = np.take_along_axis(per_seed_case_means, si, axis=1).mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), confidence)


def tost(case_diffs: np.ndarray, margin: float, alpha: float = 0.05) -> Tost:
    """TOST on per-case paired differences (one value per case, e.g. averaged over seeds)."""
    from scipy import stats

    d = np.asarray(case_diffs, dtype=np.float64).ravel()
    if d.size < 2:
        raise ValueError("TOST needs at least two paired differences")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    n = d.size
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    df = n - 1
    if se == 0.0:
        inside = -margin < mean < margin
        p = 0.0 if inside else 1.0
        return Tost(mean, n, margin, p, p, mean, mean, alpha)
    p_lower = float(stats.t.sf((mean + margin) / se, df))
    p_upper = float(stats.t.cdf((mean - margin) / se, df))
    half = float(stats.t.ppf(1.0 - alpha, df)) * se
    return Tost(mean, n, margin, p_lower, p_upper, mean - half, mean + half, alpha)


def bootstrap_equivalence(diff: np.ndarray, margin: float, alpha: float = 0.05, *, n_boot: int = 10_000, seed: int = 0) -> tuple[bool, Interval]:
    """Equivalence within +/- margin by the seed x case bootstrap: the (1 - 2 alpha) interval inside (-margin, margin)."""
    iv = seed_case_bootstrap(diff, n_boot=n_boot, confidence=1.0 - 2.0 * alpha, seed=seed)
    return (-margin < iv.lo and iv.hi < margin), iv


def min_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test on n differences of SD ``sd`` detects with ``power``."""
    from scipy import optimize, stats

    if n < 2 or not sd > 0:
        raise ValueError(f"need n >= 2 and sd > 0, got n={n}, sd={sd}")
    df = n - 1
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))

    def power_at(effect: float) -> float:
        nc = effect * math.sqrt(n) / sd
        # the wrong-sign tail is negligible here, and scipy's nct.cdf returns NaN deep in it
        wrong_tail = float(np.nan_to_num(stats.nct.cdf(-crit, df, nc), nan=0.0))
        return float(stats.nct.sf(crit, df, nc)) + wrong_tail

    # start from twice the normal-theory answer (z_0.975 + z_0.8 = 2.80) and widen; far larger noncentralities
    # make scipy's nct return NaN, so the bracket stays close to the root
    lo, hi = 0.0, 2.0 * 2.8 * sd / math.sqrt(n)
    while power_at(hi) < power:
        lo, hi = hi, 2.0 * hi
    return float(optimize.brentq(lambda e: power_at(e) - power, lo, hi, xtol=1e-12 * sd))
