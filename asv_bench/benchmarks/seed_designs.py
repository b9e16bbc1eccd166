"""The two designs of statsmodels' variance-components notebook (40,000 rows each).

* nested:  y ~ 1, a random intercept per group1 (200 levels) and group2 within group1 (4,000 levels) as a
  variance component;
* crossed: y ~ 1, one group, group1 and group2 (100 levels each) as crossed variance components.

The data are `sparsemix.datasets.seed_datasets()`, the notebook's draws. Every benchmark is parameterized by
design and by criterion (REML, ML).
"""

import numpy as np

import sparsemix
from sparsemix.datasets import seed_datasets

DESIGNS = ["nested", "crossed"]
METHODS = ["REML", "ML"]


def make_model(design, data):
    """The notebook's formula-route model for `design`, from its data frame."""
    if design == "nested":
        return sparsemix.MixedLM.from_formula(
            "y ~ 1", re_formula="1", vc_formula={"group2": "0 + C(group2)"}, groups="group1", data=data
        )
    if design == "crossed":
        return sparsemix.MixedLM.from_formula(
            "y ~ 1", groups=np.ones(len(data)), vc_formula={"g1": "0 + C(group1)", "g2": "0 + C(group2)"}, data=data
        )
    raise ValueError(f"unknown design {design!r}")


def seed_frame(design):
    nested, crossed = seed_datasets()
    return {"nested": nested, "crossed": crossed}[design]


class SeedFit:
    """From the data frame to the fitted model: formula, design, cross-products, optimizer, results."""

    params = [DESIGNS, METHODS]
    param_names = ["design", "method"]
    timeout = 300

    def setup(self, design, method):
        self.data = seed_frame(design)
        self.reml = method == "REML"

    def time_fit(self, design, method):
        make_model(design, self.data).fit(reml=self.reml)

    def peakmem_fit(self, design, method):
        make_model(design, self.data).fit(reml=self.reml)

    def track_deviance_evaluations(self, design, method):
        return make_model(design, self.data).fit(reml=self.reml).n_evaluations

    track_deviance_evaluations.unit = "evaluations"


class SeedDeviance:
    """One evaluation of the profiled deviance at the estimates: refactor L, solve, log-determinants.

    This is the unit of work the optimizer repeats; its cost does not depend on the number of rows.
    """

    params = [DESIGNS, METHODS]
    param_names = ["design", "method"]
    timeout = 300

    def setup_cache(self):
        """theta at the optimum for every (design, method): fitted once and shared by all setups."""
        nested, crossed = seed_datasets()
        frames = {"nested": nested, "crossed": crossed}
        return {
            (design, method): make_model(design, frames[design]).fit(reml=method == "REML").fit_result.theta
            for design in DESIGNS
            for method in METHODS
        }

    def setup(self, thetas, design, method):
        model = make_model(design, seed_frame(design))
        self.system = model.build_system()
        self.theta = thetas[(design, method)]
        self.reml = method == "REML"

    def time_deviance(self, thetas, design, method):
        self.system.deviance(self.theta, self.reml)
