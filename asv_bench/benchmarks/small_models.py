"""Small models: the cost of one deviance evaluation, where Python's fixed costs per call outweigh the arithmetic
(issue 16). sleepstudy (`Reaction ~ Days + (Days | Subject)`, q = 36) and mlmRev's Exam (three correlated
slopes per school, q = 195), from the committed lme4 fixtures, in each factorization a small system can take:
the one chosen by default, CHOLMOD's simplicial factor, and the dense path (core/factor.py, DenseFactor).
"""

import json
from pathlib import Path

import pandas as pd

from sparsemix.core.system import PenalizedSystem
from sparsemix.core.threads import fit_threads
from sparsemix.lme4.design import build_design

REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "reference"
MODELS = {
    "sleepstudy": ("sleepstudy.json", None, "Reaction ~ Days + (Days | Subject)"),
    "exam": ("random_slopes.json", "Exam", "normexam ~ standLRT + sex + (standLRT + sex | school)"),
}


def small_system(model, factorization):
    """The model's penalized system (factorization None: the default choice) and lme4's start, in the optimizer's
    coordinates."""
    file, key, formula = MODELS[model]
    fixture = json.loads((REFERENCE / file).read_text())
    if key is not None:
        fixture = fixture[key]
    system = build_design(formula, pd.DataFrame(fixture["data"])).system()
    if factorization is not None:
        system = PenalizedSystem(system.cross, system.relcov, factorization=factorization)
    return system, system.relcov.working_theta(system.relcov.start())


class SmallDeviance:
    """One `working_deviance` call (what the optimizer calls), in a fit's single-threaded BLAS scope."""

    params = [list(MODELS), ["default", "simplicial", "dense"]]
    param_names = ["model", "factorization"]

    def setup(self, model, factorization):
        self.system, self.working = small_system(model, None if factorization == "default" else factorization)
        self.threads = fit_threads()
        self.threads.__enter__()

    def teardown(self, model, factorization):
        self.threads.__exit__(None, None, None)

    def time_deviance(self, model, factorization):
        self.system.working_deviance(self.working, True)
