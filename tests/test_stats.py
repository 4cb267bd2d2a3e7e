"""hps_exp.stats on crafted data: exact enumeration and hand computations."""
import itertools

import numpy as np
import pytest

from hps_exp import stats


def exact_bootstrap(values):
    """Every two-level resample (seeds with replacement, then prompts within each drawn seed) with its
    probability: (values, weights)."""
    out, weights = [], []
    n_seeds = len(values)
    picks = list(itertools.product(range(n_seeds), repeat=n_seeds))
    for seed_pick in picks:
        per_slot = [[np.mean(c) for c in itertools.product(values[s], repeat=len(values[s]))] for s in seed_pick]
        combos = [np.mean(combo) for combo in itertools.product(*per_slot)]
        out += combos
        weights += [1.0 / (len(picks) * len(combos))] * len(combos)
    return np.array(out), np.array(weights)


def test_point_estimate_weighs_seeds_equally():
    assert stats.point_estimate([[0.0, 0.0, 0.0, 0.0], [4.0]]) == pytest.approx(2.0)


def test_bootstrap_one_seed_matches_exact_enumeration():
    # Resampled mean of [0, 0, 3] = number of 3's drawn ~ Binomial(3, 1/3): P(0, 1, 2, 3) = 8, 12, 6, 1 / 27.
    # 10 % quantile: cdf(0) = .30 -> 0; 90 %: cdf(1) = .74, cdf(2) = .96 -> 2.
    assert stats.bootstrap_ci([[0.0, 0.0, 3.0]], level=0.8, n_boot=20000) == (pytest.approx(1.0), 0.0, 2.0)
    # 97.5 %: cdf(2) = 26/27 = .963 < .975 -> 3
    assert stats.bootstrap_ci([[0.0, 0.0, 3.0]], level=0.95, n_boot=20000)[1:] == (0.0, 3.0)


def test_bootstrap_resamples_seeds():
    # Prompts constant within a seed: only the seed draw matters: mean in {0, 1, 2} w.p. 1/4, 1/2, 1/4.
    assert stats.bootstrap_ci([[0.0, 0.0], [2.0, 2.0]], level=0.95) == (1.0, 0.0, 2.0)
    assert stats.bootstrap_ci([[0.0, 0.0], [2.0, 2.0]], level=0.4) == (1.0, 1.0, 1.0)


def test_two_level_bootstrap_variance_matches_enumeration():
    values = [[0.0, 4.0], [1.0, 3.0, 2.0]]  # equal seed means: the spread comes from the prompts
    exact, w = exact_bootstrap(values)
    exact_mean = float(np.sum(w * exact))
    exact_var = float(np.sum(w * (exact - exact_mean) ** 2))
    reps = stats.bootstrap_distribution(values, n_boot=40000, seed=1)
    assert reps.mean() == pytest.approx(exact_mean, abs=0.05)
    assert reps.var() == pytest.approx(exact_var, rel=0.03)
    # Resampling seeds only (or prompts only) would give a clearly different spread.
    seeds_only = np.var([np.mean([np.mean(values[s]) for s in pick])
                         for pick in itertools.product(range(2), repeat=2)])
    assert abs(seeds_only - exact_var) > 0.1 * exact_var


def test_constant_data_gives_a_point_interval_and_fallback_over_seeds():
    assert stats.bootstrap_ci([[1.5, 1.5], [1.5]]) == (1.5, 1.5, 1.5)
    mean, lo, hi = stats.bootstrap_ci_seeds([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    # Seeds-only replicates are means of 5 draws from {1..5}: [lo, hi] inside [1, 5], strictly around 3.
    assert 1.0 <= lo < 2.5 and 3.5 < hi <= 5.0
    assert stats.bootstrap_ci_seeds([7.0]) == (7.0, 7.0, 7.0)


def test_bootstrap_is_reproducible_and_rejects_bad_input():
    v = [[0.1, 0.5, 0.9], [0.3, 0.2]]
    assert stats.bootstrap_ci(v, seed=3) == stats.bootstrap_ci(v, seed=3)
    with pytest.raises(ValueError, match="^values: no seeds"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match=r"values\[1\]: no values"):
        stats.bootstrap_ci([[1.0], []])
    with pytest.raises(ValueError, match=r"values\[0\]"):
        stats.bootstrap_ci([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="level=95"):
        stats.bootstrap_ci([[1.0]], level=95)


@pytest.mark.parametrize("d, expected", [
    ([1.0, 2.0, -1.0], 6 / 8),          # |±1 ±2 ±1| >= 2 in 6 of the 8 sign patterns
    ([1.0] * 5, 2 / 32),                # only all-plus and all-minus reach |mean| = 1
    ([1.0] * 6, 2 / 64),                # p < 0.05
    ([3.0, -1.0, -1.0, -1.0], 1.0),     # mean 0: every pattern is as extreme; p > 0.5
    ([0.0, 0.0], 1.0),
])
def test_paired_test_exact_hand_cases(d, expected):
    a = [[x + 5.0 for x in d]]
    b = [[5.0] * len(d)]
    assert stats.paired_test(a, b) == pytest.approx(expected)


def test_paired_test_pairs_by_seed_and_prompt():
    a = [[1.0, 2.0], [3.0]]
    b = [[0.0, 0.0], [0.0]]
    # d = 1, 2, 3: |sum| >= 6 only for all-plus / all-minus -> 2/8
    assert stats.paired_test(a, b) == pytest.approx(0.25)
    assert stats.paired_test(b, a) == pytest.approx(0.25)  # two-sided
    with pytest.raises(ValueError, match="seed row 1"):
        stats.paired_test(a, [[0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"a has 2\b.*b has 1\b"):
        stats.paired_test(a, [[0.0, 0.0]])


def test_paired_test_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(0)
    d = rng.normal(0.4, 1.0, size=14)
    a, b = [list(d)], [[0.0] * 14]
    exact = stats.paired_test(a, b)
    mc = stats.paired_test(a, b, max_exact=0, n_perm=40000, seed=5)
    assert 0.01 < exact < 0.9  # a case where the two can disagree
    assert mc == pytest.approx(exact, abs=0.01)


def test_paired_test_large_samples():
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, size=(5, 40))
    shifted = base + 0.5 + rng.normal(0.0, 0.5, size=(5, 40))
    p = stats.paired_test(shifted.tolist(), base.tolist(), n_perm=2000)
    assert p == pytest.approx(1 / 2001)  # no sign pattern reaches a shift of 0.5 sd over 200 pairs
    noise = base + rng.normal(0.0, 0.5, size=(5, 40))
    assert stats.paired_test(noise.tolist(), base.tolist(), n_perm=2000) > 0.05
    assert stats.paired_test(shifted.tolist(), base.tolist(), n_perm=2000, seed=9) == p  # seeded


def test_fmt_p():
    assert stats.fmt_p(0.04567) == "0.046"
    assert stats.fmt_p(0.0001234) == "1.2e-04"
    assert stats.fmt_p(None) == "–"
