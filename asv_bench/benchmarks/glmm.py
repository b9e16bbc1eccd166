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
