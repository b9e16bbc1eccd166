"""Many fits of one model (issue 16, "many fits"): `refit(y)` against `lmer` on a data frame holding the new
response, `lmer_many` over many responses, and the parametric bootstrap's throughput, on sleepstudy's
`Reaction ~ Days + (Days | Subject)`
(the data of tests/reference/sleepstudy.json, lme4's).

The bootstrap runs in this process (n_jobs=1): its cost per replicate, which the workers of a parallel run
divide among the cores."""

import json
import warnings
from pathlib import Path

import pandas as pd

import sparsemix

FORMULA = "Reaction ~ Days + (Days | Subject)"
SLEEPSTUDY = Path(__file__).resolve().parents[2] / "tests" / "reference" / "sleepstudy.json"


def sleepstudy() -> pd.DataFrame:
    return pd.DataFrame(json.loads(SLEEPSTUDY.read_text())["data"])


class Refit:
    """One more response for a fitted model: refit(y) (the design, cross-products' fixed part and factorization
    reused) against lmer on a data frame with that response (everything from the formula)."""

    timeout = 120

    def setup(self):
        self.data = sleepstudy()
        self.model = sparsemix.lmer(FORMULA, self.data)
        self.y = self.model.simulate(1, seed=1)["sim_1"].to_numpy()
        self.model.refit(self.y)  # the first refit sets up what the next ones reuse
        self.frame = self.data.assign(Reaction=self.y)

    def time_refit(self):
        self.model.refit(self.y)

    def time_lmer(self):
        sparsemix.lmer(FORMULA, self.frame)

    def track_refit_evaluations(self):
        return self.model.refit(self.y).n_evaluations

    track_refit_evaluations.unit = "evaluations"

    def time_lmer_many_20(self):
        sparsemix.lmer_many("y ~ Days + (Days | Subject)", self.data, self.model.simulate(20, seed=2))


class ManyResponses:
    """lmer_many over 1,000 responses (the batched Newton steps, fit/many.py: divide by 1,000 for a fit), and
    how many of them the batched steps settled (the others are refitted one at a time)."""

    timeout = 300

    def setup(self):
        self.data = sleepstudy()
        self.sims = sparsemix.lmer(FORMULA, self.data).simulate(1000, seed=3)

    def _fit(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sparsemix.lmer_many("y ~ Days + (Days | Subject)", self.data, self.sims)

    def time_lmer_many_1000(self):
        self._fit()

    def time_lmer_many_1000_estimates(self):
        self._fit().estimates

    def track_batched_share(self):
        return float(self._fit().batched.mean())

    track_batched_share.unit = "share"


class Bootstrap:
    """A 100-replicate parametric bootstrap in one process (divide by 100 for the cost of a replicate)."""

    timeout = 300

    def setup(self):
        self.model = sparsemix.lmer(FORMULA, sleepstudy())

    def time_bootstrap_100(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.bootstrap(nsim=100, seed=1, n_jobs=1)
