"""Scale benchmarks: crossed random slopes at growing n, and the cost of one deviance evaluation as n grows.

The cost of an evaluation must not depend on n once the cross-products exist: `DevianceVersusRows` keeps the
levels fixed and multiplies the rows by 10. The 1,000,000-row fit of the performance issue is slow (tens of
seconds) and runs only when SPARSEMIX_BENCH_SLOW=1 is set.
"""

import os

import numpy as np
import pandas as pd

import sparsemix
from sparsemix.datasets import generate_crossed_slopes, generate_insteval_like, generate_ratings

SLOW = os.environ.get("SPARSEMIX_BENCH_SLOW") == "1"
FORMULA = "y ~ 1 + x + (1 + x | a) + (1 | b)"


INSTEVAL_FORMULA = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)"


class _OneFormulaFit:
    """A fit of `formula` to the data `setup` makes: its time, peak memory and deviance evaluations."""

    timeout = 600
    formula = ""

    def time_fit(self):
        sparsemix.lmer(self.formula, self.data)

    def peakmem_fit(self):
        sparsemix.lmer(self.formula, self.data)

    def track_deviance_evaluations(self):
        return sparsemix.lmer(self.formula, self.data).n_evaluations

    track_deviance_evaluations.unit = "evaluations"


class InstEvalSizedFit(_OneFormulaFit):
    """lme4's InstEval model on a synthetic design of its size: 73,000 rows, 2,972 x 1,128 crossed levels and a
    28-level interaction; the Schur form factors a dense 1,156 x 1,156 block per evaluation."""

    formula = INSTEVAL_FORMULA

    def setup(self):
        self.data = generate_insteval_like()


def nested_slopes(n_children: int, n_schools: int, seed: int = 0) -> pd.DataFrame:
    """Children measured in five years (4 of 5 kept at random) in schools, with slopes at both levels: mlmRev's
    egsingle's shape."""
    rng = np.random.default_rng(seed)
    child = np.repeat(np.arange(n_children), 5)
    school, year = child % n_schools, np.tile(np.arange(5) - 2.0, n_children)
    keep = rng.random(child.size) < 0.8
    child, school, year = child[keep], school[keep], year[keep]
    by_child = rng.normal(size=(n_children, 2)) * [0.8, 0.15]
    by_school = rng.normal(size=(n_schools, 2)) * [0.4, 0.1]
    effect = by_child[child] + by_school[school]
    y = -0.8 + 0.8 * year + effect[:, 0] + effect[:, 1] * year + 0.5 * rng.normal(size=child.size)
    return pd.DataFrame({"y": y, "year": year, "child": [f"c{c}" for c in child], "school": [f"s{s}" for s in school]})


class NestedSlopesFit(_OneFormulaFit):
    """Children with slopes in schools with slopes, 450 x 30 levels (960 columns): held dense, the children's term
    eliminated level by level beside the schools', Newton steps with ProfiledGradient.eliminated_hessian (5
    evaluations where L-BFGS-B took 25)."""

    formula = "y ~ year + (year | child) + (year | school)"

    def setup(self):
        self.data = nested_slopes(450, 30)


RATINGS_FORMULA = "y ~ 1 + (1 | user) + (1 | item)"


class RatingsSizedFit(_OneFormulaFit):
    """The MovieLens-sized fit's path at a benchmark's size (asv_bench/compare/movielens/fit.py has the full one):
    2,000,000 ratings of 40,000 users x 4,000 items; the users' pairs of items are too many for the pair map, so
    the Schur update runs in tiles (kernels.LevelBands), and the Newton steps score its variance components."""

    formula = RATINGS_FORMULA

    def setup(self):
        self.data = generate_ratings(2_000_000, 40_000, 4_000)


class CrossedSlopesFit:
    """y ~ 1 + x + (1 + x | a) + (1 | b) with n / 20 levels of a and 1,000 of b."""

    params = [100_000, 1_000_000]
    param_names = ["n"]
    timeout = 1800

    def setup(self, n):
        if n >= 1_000_000 and not SLOW:
            raise NotImplementedError("set SPARSEMIX_BENCH_SLOW=1 for the 1,000,000-row fit")
        self.data = generate_crossed_slopes(n=n, n_a=n // 20, n_b=1_000)

    def time_fit(self, n):
        sparsemix.lmer(FORMULA, self.data)

    def peakmem_fit(self, n):
        sparsemix.lmer(FORMULA, self.data)

    def track_deviance_evaluations(self, n):
        return sparsemix.lmer(FORMULA, self.data).n_evaluations

    track_deviance_evaluations.unit = "evaluations"


def replicated(data, times, seed=0):
    """`times` copies of the rows' (a, b) pairs with fresh x and y: the same Z'Z pattern with times x the rows.
    (Adding rows with new pairs instead would fill Z'Z and make the system itself larger.)"""
    rng = np.random.default_rng(seed)
    reps = [data] + [data.assign(x=rng.normal(size=len(data))) for _ in range(times - 1)]
    out = pd.concat(reps, ignore_index=True)
    out["y"] = out["y"] + rng.normal(size=len(out))
    return out


class DevianceVersusRows:
    """Same levels and the same Z'Z pattern (2,000 x 200 levels), 10x the rows: one evaluation's time should
    not change, since it only touches the cross-products."""

    params = [1, 10]
    param_names = ["copies"]

    def setup(self, copies):
        data = replicated(generate_crossed_slopes(n=50_000, n_a=2_000, n_b=200), copies)
        model = sparsemix.lmer(FORMULA, data)
        self.system = model.fit_result.system
        self.theta = model.theta

    def time_deviance(self, copies):
        with self.system.threads():
            self.system.deviance(self.theta, True)
