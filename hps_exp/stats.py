"""Confidence intervals and a paired test for results over seeds x held-out prompts.

- `bootstrap_ci(values)`: values[s][p] = a metric of prompt p in seed s. Two-level (hierarchical) bootstrap:
  resample the seeds with replacement, then the prompts within each drawn seed; the statistic is the mean over
  seeds of the per-seed prompt mean; percentile interval. Seeds carry training noise, prompts evaluation noise:
  resampling only one of them would make the interval too narrow.
- `bootstrap_ci_seeds(values)`: the fallback for metrics with one number per seed (no per-prompt values).
- `paired_test(a, b)`: two-sided paired sign-flip permutation test on d = a - b, paired by (seed, prompt);
  exact enumeration of all 2^n sign patterns for small n, Monte Carlo with a fixed seed otherwise.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_N_BOOT = 4000
DEFAULT_N_PERM = 20000
MAX_EXACT = 16  # 2^16 sign patterns enumerated exactly; above: Monte Carlo


def _as_rows(values: Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    if len(values) == 0:
        raise ValueError(f"{name}: no seeds")
    rows = []
    for s, row in enumerate(values):
        arr = np.asarray(row, dtype=float).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"{name}[{s}]: no values")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}[{s}]: non-finite value")
        rows.append(arr)
    return rows


def point_estimate(values: Sequence[Sequence[float]]) -> float:
    """Mean over seeds of the mean over each seed's prompts (every seed weighs the same)."""
    return float(np.mean([row.mean() for row in _as_rows(values, "values")]))


def bootstrap_distribution(values: Sequence[Sequence[float]], n_boot: int = DEFAULT_N_BOOT,
                           seed: int = 0) -> np.ndarray:
    """n_boot bootstrap replicates of `point_estimate` (seeds resampled, then prompts within each drawn seed)."""
    rows = _as_rows(values, "values")
    rng = np.random.default_rng(seed)
    n_seeds = len(rows)
    drawn_seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    # Each (replicate, slot) gets its own prompt resample of the seed drawn into that slot.
    slot_means = np.empty((n_boot, n_seeds))
    for s, row in enumerate(rows):
        where = drawn_seeds == s
        k = int(where.sum())
        if k:
            picks = rng.integers(0, row.size, size=(k, row.size))
            slot_means[where] = row[picks].mean(axis=1)
    return slot_means.mean(axis=1)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must be in (0, 1)")


def bootstrap_ci(values: Sequence[Sequence[float]], level: float = 0.95, n_boot: int = DEFAULT_N_BOOT,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): point estimate and the percentile bootstrap interval at `level` (seeds x prompts)."""
    _check_level(level)
    mean = point_estimate(values)
    reps = bootstrap_distribution(values, n_boot, seed)
    alpha = (1.0 - level) / 2.0
    # "lower"/"higher": interval ends are values the bootstrap actually produced (no interpolation).
    lo = float(np.quantile(reps, alpha, method="lower"))
    hi = float(np.quantile(reps, 1.0 - alpha, method="higher"))
    return mean, lo, hi


def bootstrap_ci_seeds(values: Sequence[float], level: float = 0.95, n_boot: int = DEFAULT_N_BOOT,
                       seed: int = 0) -> tuple[float, float, float]:
    """Seeds-only bootstrap, for metrics reported as one number per seed."""
    return bootstrap_ci([[float(v)] for v in values], level, n_boot, seed)


def paired_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    ra, rb = _as_rows(a, "a"), _as_rows(b, "b")
    if len(ra) != len(rb):
        raise ValueError(f"paired_test: a has {len(ra)} seeds, b has {len(rb)}")
    for s, (x, y) in enumerate(zip(ra, rb)):
        if x.size != y.size:
            raise ValueError(f"paired_test: seed row {s} has {x.size} values in a and {y.size} in b")
    return np.concatenate([x - y for x, y in zip(ra, rb)])


def paired_test(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_perm: int = DEFAULT_N_PERM,
                seed: int = 0, max_exact: int = MAX_EXACT) -> float:
    """Two-sided p-value of H0 "a and b are exchangeable within each (seed, prompt) pair".

    Statistic |mean(d)|, d = a - b. Under H0 each d_i's sign is a fair coin. Exact: the fraction of all 2^n
    sign patterns whose |mean| is >= the observed one. Monte Carlo (n > max_exact): (1 + hits) / (1 + n_perm),
    which never reports p = 0.
    """
    d = paired_differences(a, b)
    n = d.size
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))  # float noise must not turn a tie into a miss
    if n <= max_exact:
        patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        stats = np.abs(patterns @ d) / n
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1000):  # chunks bound the memory at 1000 x n signs
        k = min(1000, n_perm - start)
        signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) / n >= observed - tol))
    return (1 + hits) / (1 + n_perm)


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
