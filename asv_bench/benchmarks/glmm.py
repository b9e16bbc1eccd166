"""glmer (issue 17): VerbAgg's crossed binary model by the Laplace approximation, and cbpp's cbind() response
with 9 quadrature nodes (the data of tests/reference/glmer.json, lme4's)."""

import json
from pathlib import Path

import pandas as pd

import sparsemix

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "reference" / "glmer.json"


class Glmer:
    timeout = 300

    def setup(self):
        doc = json.loads(FIXTURES.read_text())
        self.verbagg = pd.DataFrame(doc["VerbAgg"]["data"])
        self.cbpp = pd.DataFrame(doc["cbpp"]["data"])

    def time_verbagg_laplace(self):
        sparsemix.glmer("y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", self.verbagg)

    def time_cbpp_agq9(self):
        sparsemix.glmer("cbind(incidence, size - incidence) ~ period + (1 | herd)", self.cbpp, nAGQ=9)

    def track_verbagg_evaluations(self):
        return sparsemix.glmer("y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", self.verbagg).n_evaluations

    track_verbagg_evaluations.unit = "evaluations"


class GlmerSmall:
    """Small and mid-sized glmer fits from a data frame (issue 16's small models, for GLMMs): cbpp (56 rows, M held
    dense), Contraception (1,934 rows, 60 districts) and grouseticks (403 rows, three crossed and nested intercepts:
    M^{-1} read off the block factor), each by Newton steps on the exact gradient (core/glmm.py), and the
    evaluations they take."""

    MODELS = {
        "cbpp": ("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial"),
        "contraception": ("Contraception", "use01 ~ age + I(age^2) + urban + livch + (1 | district)", "binomial"),
        "grouseticks": (
            "grouseticks",
            "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
            "poisson",
        ),
    }
    params = [list(MODELS)]
    param_names = ["model"]
    timeout = 120

    def setup(self, model):
        key, self.formula, self.family = self.MODELS[model]
        self.data = pd.DataFrame(json.loads(FIXTURES.read_text())[key]["data"])

    def time_fit(self, model):
        sparsemix.glmer(self.formula, self.data, family=self.family)

    def track_evaluations(self, model):
        return sparsemix.glmer(self.formula, self.data, family=self.family).n_evaluations

    track_evaluations.unit = "evaluations"


class GlmerPirls:
    """One PIRLS solve (warm-started, to convergence) of a crossed binary design large enough for the sparse
    first-by-rest block and its compiled W'W update (core/glmm.py BlockFactor): 200,000 rows, 4,000 x 1,000
    levels, the design of asv_bench/compare/glmm/glmer_scale.py."""

    timeout = 300

    def setup(self):
        import sys

        import numpy as np

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compare" / "glmm"))
        from glmer_scale import simulate

        from sparsemix.core.cross_products import assemble_Z
        from sparsemix.core.glmm import LaplaceSystem
        from sparsemix.core.relcov import RelativeCovariance
        from sparsemix.families import Binomial
        from sparsemix.lme4.design import build_design

        data, formula, _ = simulate("binary", 200_000, 4_000, 1_000)
        design = build_design(formula, data, linear=False)
        terms = list(design.terms)
        relcov = RelativeCovariance([(t.n_levels, t.template) for t in terms])
        self.system = LaplaceSystem(design.X, design.y, assemble_Z(terms), relcov, Binomial())
        self.theta, self.beta = np.array([0.8, 0.5]), np.array([-0.3, 0.5])
        self.system.pirls(self.theta, self.beta)
        self.step = 0

    def time_pirls(self):
        self.step += 1  # a nearby point each time, as a difference Hessian's evaluations are
        self.system.pirls(self.theta * (1 + 1e-4 * (self.step % 7)), self.beta)


class GlmerProfile:
    """confint(method="profile") of a correlated random slope on lme4's sd/cor scale (the fixture's binary model)."""

    timeout = 300

    def setup(self):
        doc = json.loads(FIXTURES.read_text())
        self.model = sparsemix.glmer("y ~ x + (1 + x | g)", pd.DataFrame(doc["correlated"]["data"]))

    def time_profile(self):
        self.model.confint(method="profile")
