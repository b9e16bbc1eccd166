"""Simulated designs from statsmodels' variance-components notebook.

The notebook seeds numpy's global generator with 3123 and then draws the nested data set followed by the
crossed one. `seed_datasets()` replays that stream with a private RandomState, so the data (and therefore
the fitted numbers quoted in the notebook) are reproduced without touching global state.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["generate_nested", "generate_crossed", "generate_crossed_slopes", "seed_datasets", "NOTEBOOK_SEED"]

NOTEBOOK_SEED = 3123


def _as_random_state(rng) -> np.random.RandomState:
    if isinstance(rng, np.random.RandomState):
        return rng
    return np.random.RandomState(rng)


def generate_nested(n_group1=200, n_group2=20, n_rep=10, group1_sd=2.0, group2_sd=3.0, unexplained_sd=4.0,
                    rng=None) -> pd.DataFrame:
    """Group 2 nested within group 1; columns y, group1, group2 (group2 labels repeat across group 1)."""
    rng = _as_random_state(rng)
    per_group1 = n_group2 * n_rep
    group1 = np.repeat(np.arange(n_group1), per_group1).astype(float)
    effects1 = np.repeat(group1_sd * rng.normal(size=n_group1), per_group1)
    group2 = np.tile(np.repeat(np.arange(n_group2), n_rep), n_group1).astype(float)
    effects2 = np.repeat(group2_sd * rng.normal(size=n_group1 * n_group2), n_rep)
    e = unexplained_sd * rng.normal(size=n_group1 * n_group2 * n_rep)
    return pd.DataFrame({"y": effects1 + effects2 + e, "group1": group1, "group2": group2})


def generate_crossed(n_group1=100, n_group2=100, n_rep=4, group1_sd=2.0, group2_sd=3.0, unexplained_sd=4.0,
                     rng=None) -> pd.DataFrame:
    """Two crossed factors with random level assignment; columns y, group1, group2 (integers)."""
    rng = _as_random_state(rng)
    n = n_group1 * n_group2 * n_rep
    group1 = np.repeat(np.arange(n_group1), n // n_group1)
    group1 = group1[rng.permutation(n)]
    effects1 = (group1_sd * rng.normal(size=n_group1))[group1]
    group2 = np.repeat(np.arange(n_group2), n // n_group2)
    group2 = group2[rng.permutation(n)]
    effects2 = (group2_sd * rng.normal(size=n_group2))[group2]
    e = unexplained_sd * rng.normal(size=n)
    return pd.DataFrame({"y": effects1 + effects2 + e, "group1": group1, "group2": group2})


def seed_datasets(seed: int = NOTEBOOK_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(nested, crossed) exactly as the notebook draws them after ``np.random.seed(seed)``."""
    rng = np.random.RandomState(seed)
    nested = generate_nested(rng=rng)
    crossed = generate_crossed(rng=rng)
    return nested, crossed


def generate_crossed_slopes(n: int = 1_000_000, n_a: int = 50_000, n_b: int = 1_000, seed: int = 2026) -> pd.DataFrame:
    """The performance suite's synthetic crossed design with random slopes: y ~ 1 + x + (1 + x | a) + (1 | b).

    Levels are drawn uniformly (every level of a appears about n / n_a times); true values: intercept 1, slope
    0.5, sd(a intercept) 1, sd(a slope) 0.5, correlation 0.3, sd(b) 0.7, residual sd 1.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_a, n)
    b = rng.integers(0, n_b, n)
    x = rng.normal(size=n)
    cov = np.array([[1.0, 0.3 * 0.5], [0.3 * 0.5, 0.25]])
    u = rng.multivariate_normal([0.0, 0.0], cov, size=n_a)
    v = 0.7 * rng.normal(size=n_b)
    y = 1.0 + 0.5 * x + u[a, 0] + u[a, 1] * x + v[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})
