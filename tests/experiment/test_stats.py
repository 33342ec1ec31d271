"""The comparison statistics against hand-computed values and independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from skullrec.experiment.stats import bootstrap_equivalence, min_detectable_effect, seed_case_bootstrap, tost

# Five paired differences worked by hand: mean 0.005; deviations 0.007, -0.009, 0.001, -0.003, 0.004;
# sum of squares 156e-6, variance 39e-6, SD 0.0062450, SE 0.0027928; t(0.95, 4) = 2.131847 from a table.
DIFFS = np.array([0.012, -0.004, 0.006, 0.002, 0.009])
SE = math.sqrt(39e-6 / 5)


def test_tost_matches_the_hand_computation() -> None:
    r = tost(DIFFS, margin=0.01)
    assert r.mean == pytest.approx(0.005)
    assert r.n == 5
    # 90 % interval = mean +/- t(0.95, 4) * SE = 0.005 +/- 0.0059538
    assert r.ci_lo == pytest.approx(0.005 - 2.131847 * SE, abs=1e-6)
    assert r.ci_hi == pytest.approx(0.005 + 2.131847 * SE, abs=1e-6)
    # t statistics by hand: (0.005 + 0.01) / SE = 5.3709 (p far below 0.05), (0.005 - 0.01) / SE = -1.7903:
    # between t(0.90, 4) = 1.5332 and t(0.95, 4) = 2.1318 in size, so 0.05 < p_upper < 0.10.
    assert r.p_lower < 0.005
    assert 0.05 < r.p_upper < 0.10
    assert r.p == r.p_upper
    assert not r.equivalent  # the interval reaches 0.01095 > 0.01


def test_tost_accepts_when_the_interval_fits_the_margin() -> None:
    r = tost(DIFFS, margin=0.012)  # 0.010954 < 0.012 and -0.000954 > -0.012
    assert r.equivalent
    assert r.p < 0.05
    # shifting every difference by the margin puts the mean on the boundary: never equivalent
    assert not tost(DIFFS - DIFFS.mean() + 0.012, margin=0.012).equivalent


def test_tost_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        tost(np.array([0.1]), margin=0.01)
    with pytest.raises(ValueError):
        tost(DIFFS, margin=0.0)


def test_seed_case_bootstrap_matches_the_exact_resampling_distribution() -> None:
    # 2 seeds x 2 cases: 4 seed draws x 4 case draws = 16 equally likely replicates, enumerated exactly.
    d = np.array([[0.0, 0.04], [0.02, 0.10]])
    exact = []
    for s in itertools.product(range(2), repeat=2):
        for c in itertools.product(range(2), repeat=2):
            exact.append(d[np.ix_(s, c)].mean())
    exact = np.sort(exact)
    iv = seed_case_bootstrap(d, n_boot=40_000, confidence=0.5, seed=3)
    assert iv.mean == pytest.approx(d.mean())
    # the 25 % / 75 % quantiles of the exact 16-point distribution (numpy's linear rule), within sampling noise
    lo, hi = np.quantile(exact, [0.25, 0.75])
    assert iv.lo == pytest.approx(lo, abs=0.004)
    assert iv.hi == pytest.approx(hi, abs=0.004)


def test_seed_case_bootstrap_widens_with_seed_noise() -> None:
    rng = np.random.default_rng(0)
    cases = rng.normal(0.0, 0.01, size=19)
    calm = np.stack([cases, cases, cases])
    noisy = calm + np.array([[-0.01], [0.0], [0.01]])  # the seeds disagree by +/- 0.01
    w_calm = seed_case_bootstrap(calm).hi - seed_case_bootstrap(calm).lo
    w_noisy = seed_case_bootstrap(noisy).hi - seed_case_bootstrap(noisy).lo
    assert w_noisy > 1.5 * w_calm
    const = seed_case_bootstrap(np.full((3, 5), 0.02))
    assert const.lo == pytest.approx(0.02) and const.hi == pytest.approx(0.02)


def test_bootstrap_equivalence() -> None:
    d = np.full((3, 19), 0.001) + np.random.default_rng(1).normal(0, 0.002, size=(3, 19))
    ok, iv = bootstrap_equivalence(d, margin=0.01)
    assert ok and -0.01 < iv.lo < iv.hi < 0.01 and iv.confidence == pytest.approx(0.90)
    ok, _ = bootstrap_equivalence(d + 0.02, margin=0.01)
    assert not ok


def test_min_detectable_effect_by_simulation() -> None:
    sd, n = 0.02, 19
    mde = min_detectable_effect(sd, n)
    # Large-sample check: (z_0.975 + z_0.8) * sd / sqrt(n) = 2.8016 * sd / sqrt(n); the t-test needs a bit more.
    assert 2.8016 * sd / math.sqrt(n) < mde < 1.1 * 2.8016 * sd / math.sqrt(n)
    # Independent check: simulate paired t-tests with that true difference; about 80 % reject.
    from scipy import stats

    rng = np.random.default_rng(7)
    draws = rng.normal(mde, sd, size=(20_000, n))
    p = stats.ttest_1samp(draws, 0.0, axis=1).pvalue
    assert float((p < 0.05).mean()) == pytest.approx(0.80, abs=0.012)
    # and for a large n the normal approximation holds
    assert min_detectable_effect(1.0, 2000) == pytest.approx(2.8016 / math.sqrt(2000), rel=2e-3)


def test_paired_differences_pairs_by_seed_and_case_and_leaves_cases_out() -> None:
    from skullrec.experiment.report import paired_differences

    rows = []
    for method, bump in (("baseline", 0.0), ("fam", 0.01)):
        for seed in (0, 1):
            for k, case in enumerate(("002", "052", "010")):
                rows.append({"method": method, "seed": str(seed), "epoch": "200", "set": "eval_set1", "case": case,
                             "target": "implant", "dsc": str(0.5 + 0.1 * k + 0.02 * seed + bump)})
    rows.append({"method": "fam", "seed": "2", "epoch": "200", "set": "eval_set1", "case": "002", "target": "implant", "dsc": "0.9"})
    d, seeds, cases = paired_differences(rows, "fam", "baseline", target="implant", split="eval_set1", epoch=200, exclude={"052"})
    assert seeds == [0, 1]  # seed 2 has no baseline partner
    assert cases == ["002", "010"]
    np.testing.assert_allclose(d, 0.01)
