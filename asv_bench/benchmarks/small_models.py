"""Small models (issue 16): whole fits from a data frame, the evaluations they take, and the cost of one deviance
evaluation (with its exact gradient, core/gradient.py), where Python's fixed costs per call outweigh the arithmetic.
sleepstudy (`Reaction ~ Days + (Days | Subject)`, q = 36), mlmRev's Exam (three correlated slopes per school,
q = 195), nlme's Oxboys (a quadratic growth curve with a 3 x 3 covariance per boy; it and sleepstudy start from
their levels' own fits, pilot.moment_start), Penicillin (two crossed variance components) and Dyestuff (one
variance: optimize.scalar_newton) and the simulated 30 subjects x 20 items with a condition's slope in both (held
whole: Newton steps with the exact Hessian) and mlmRev's Early with lme4's `(age || id)` (its scalar terms one
diagonal term to the optimizer: pipeline.optimized_system) and nlme's Pixel (a dog's day slopes, its sides nested:
Exam, the subjects x items and Pixel start from MINQUE's moments, pilot.covariance_start), from the committed lme4
fixtures; one evaluation (and
one with its exact Hessian) in each factorization a small system can take: the one chosen by default, CHOLMOD's
simplicial factor, and the dense path (core/factor.py, DenseFactor).
"""

import json
import warnings
from pathlib import Path

import pandas as pd

import sparsemix
from sparsemix.core.system import PenalizedSystem
from sparsemix.core.threads import fit_threads
from sparsemix.lme4.design import build_design

REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "reference"
MODELS = {
    "sleepstudy": ("sleepstudy.json", None, "Reaction ~ Days + (Days | Subject)"),
    "exam": ("random_slopes.json", "Exam", "normexam ~ standLRT + sex + (standLRT + sex | school)"),
    "oxboys": ("random_slopes.json", "Oxboys", "height ~ age + I(age^2) + (age + I(age^2) | Subject)"),
    "penicillin": ("penicillin.json", None, "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    "dyestuff": ("dyestuff.json", None, "Yield ~ 1 + (1 | Batch)"),
    "subjects_items": ("random_slopes.json", "subjects_items", "rt ~ cond + (cond | subj) + (cond | item)"),
    "early_uncorr": ("random_slopes.json", "Early", "cog ~ age * trt + (age || id)"),
    "pixel": ("random_slopes.json", "Pixel", "pixel ~ day + I(day^2) + (day | Dog) + (1 | Side:Dog)"),
}


def model_data(model) -> pd.DataFrame:
    file, key, _ = MODELS[model]
    fixture = json.loads((REFERENCE / file).read_text())
    return pd.DataFrame((fixture if key is None else fixture[key])["data"])


def small_system(model, factorization):
    """The model's penalized system (factorization None: the default choice) and lme4's start, in the optimizer's
    coordinates."""
    system = build_design(MODELS[model][2], model_data(model)).system()
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

    def time_deviance_and_gradient(self, model, factorization):
        if self.system.supports_gradient:
            self.system.working_deviance_gradient(self.working, True)

    def time_deviance_gradient_and_hessian(self, model, factorization):
        if self.system.supports_hessian:
            self.system.working_deviance_hessian(self.working, True)


class SmallFit:
    """A whole REML fit, `lmer(formula, data)`, as a user calls it; and the deviance evaluations it takes."""

    params = [list(MODELS)]
    param_names = ["model"]

    def setup(self, model):
        self.data = model_data(model)
        warnings.simplefilter("ignore", sparsemix.SparsemixWarning)  # Exam and Oxboys fit singular

    def time_lmer(self, model):
        sparsemix.lmer(MODELS[model][2], self.data)

    def track_evaluations(self, model):
        return sparsemix.lmer(MODELS[model][2], self.data).n_evaluations

    track_evaluations.unit = "evaluations"


class FreshProcess:
    """What a script that fits one model pays, in a fresh interpreter each sample: `import sparsemix`, and the first
    fit after it (sleepstudy's growth curve loads the compiled kernels, core/kernels.py; Penicillin's variance
    components need none)."""

    repeat = 5

    def timeraw_import(self):
        return "import sparsemix"

    def timeraw_first_fit(self, model):
        file, key, formula = MODELS[model]
        setup = f"""
            import json, warnings
            import pandas as pd
            import sparsemix
            warnings.simplefilter("ignore")
            fixture = json.loads(open({str(REFERENCE / file)!r}).read())
            data = pd.DataFrame((fixture if {key!r} is None else fixture[{key!r}])["data"])
        """
        return f"sparsemix.lmer({formula!r}, data)", setup

    timeraw_first_fit.params = ["sleepstudy", "penicillin"]
    timeraw_first_fit.param_names = ["model"]
