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


def generate_nested(
    n_group1=200, n_group2=20, n_rep=10, group1_sd=2.0, group2_sd=3.0, unexplained_sd=4.0, rng=None
) -> pd.DataFrame:
    """Group 2 nested within group 1; columns y, group1, group2 (group2 labels repeat across group 1)."""
    rng = _as_random_state(rng)
    per_group1 = n_group2 * n_rep
    group1 = np.repeat(np.arange(n_group1), per_group1).astype(float)
    effects1 = np.repeat(group1_sd * rng.normal(size=n_group1), per_group1)
    group2 = np.tile(np.repeat(np.arange(n_group2), n_rep), n_group1).astype(float)
    effects2 = np.repeat(group2_sd * rng.normal(size=n_group1 * n_group2), n_rep)
    e = unexplained_sd * rng.normal(size=n_group1 * n_group2 * n_rep)
    return pd.DataFrame({"y": effects1 + effects2 + e, "group1": group1, "group2": group2})


def generate_crossed(
    n_group1=100, n_group2=100, n_rep=4, group1_sd=2.0, group2_sd=3.0, unexplained_sd=4.0, rng=None
) -> pd.DataFrame:
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


def generate_ratings(
    n: int = 32_000_000,
    n_users: int = 200_000,
    n_items: int = 16_000,
    min_user: int = 20,
    min_item: int = 50,
    seed: int = 2026,
) -> pd.DataFrame:
    """A synthetic ratings table sized like MovieLens ml-32m restricted to movies with at least 50 ratings, for
    y ~ 1 + (1 | user) + (1 | item).

    Every user rates at least `min_user` times and every item is rated at least `min_item` times; the rest of
    the rows go to users with lognormal activity (sd 1.2 on the log scale: a few users rate thousands of items)
    and to items with Zipf-like popularity (weight (rank + 20)^-1.1), drawn independently, so a user may rate an
    item twice, which changes nothing for the model. True values: mean 3.5, sd(user) 0.45, sd(item) 0.55,
    residual sd 0.9. Columns: y (float64), user and item (int32 codes).
    """
    if n < n_users * min_user + n_items * min_item:
        raise ValueError("n is too small for the minimum ratings per user and per item")
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.2, n_users)
    popularity = (np.arange(n_items) + 20.0) ** -1.1
    rest = n - n_users * min_user - n_items * min_item
    user = np.concatenate(
        [
            np.repeat(np.arange(n_users, dtype=np.int32), min_user),
            rng.integers(0, n_users, n_items * min_item, dtype=np.int32),
            _draw(rng, activity, rest),
        ]
    )
    item = np.concatenate(
        [
            rng.integers(0, n_items, n_users * min_user, dtype=np.int32),
            np.repeat(np.arange(n_items, dtype=np.int32), min_item),
            _draw(rng, popularity, rest),
        ]
    )
    y = 3.5 + 0.45 * rng.normal(size=n_users)[user] + 0.55 * rng.normal(size=n_items)[item] + 0.9 * rng.normal(size=n)
    return pd.DataFrame({"y": y, "user": user, "item": item})


def _draw(rng, weights: np.ndarray, size: int) -> np.ndarray:
    """`size` codes drawn with probabilities proportional to `weights`, as int32."""
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").astype(np.int32)


def generate_insteval_like(
    n_students: int = 2_972,
    n_lecturers: int = 1_128,
    n_depts: int = 14,
    ratings_per_student: float = 24.7,
    seed: int = 2026,
) -> pd.DataFrame:
    """A synthetic design sized like lme4's InstEval (73,421 ratings of 1,128 lecturers by 2,972 students, 14
    departments, a lecture given as a service course or not), for y ~ 1 + service + (1|s) + (1|d) +
    (1|dept:service). Each lecturer belongs to one department; students rate a Poisson number of lecturers
    (at least 2), drawn with popularity weights. True values: sd(s) 0.33, sd(d) 0.52, sd(dept:service) 0.11,
    residual sd 1.18, service effect -0.07 (InstEval's REML estimates, rounded).
    """
    rng = np.random.default_rng(seed)
    counts = np.maximum(rng.poisson(ratings_per_student, n_students), 2)
    s = np.repeat(np.arange(n_students), counts)
    popularity = rng.gamma(1.0, 1.0, n_lecturers)
    d = _draw(rng, popularity, s.shape[0])
    dept_of = rng.integers(0, n_depts, n_lecturers)
    service = rng.integers(0, 2, s.shape[0])
    dept = dept_of[d]
    y = (
        3.2
        - 0.07 * service
        + 0.33 * rng.normal(size=n_students)[s]
        + 0.52 * rng.normal(size=n_lecturers)[d]
        + 0.11 * rng.normal(size=(n_depts, 2))[dept, service]
        + 1.18 * rng.normal(size=s.shape[0])
    )
    return pd.DataFrame({"y": y, "s": s, "d": d, "dept": dept, "service": service.astype(str)})
