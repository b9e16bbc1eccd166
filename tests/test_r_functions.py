"""R's functions in lme4 formulas (splines' ns() and bs(), relevel(), ifelse(), pmin()/pmax(), %in% with c()) read as
R reads them: lme4's optimum, its coefficients column by column (their names are patsy's), and its population-level
predictions on new data (the splines' knots kept from the fitted data; new values past them extrapolated as R does).
Fixtures: tests/reference/r_functions_fixtures.R."""

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix import FormulaError

DOC = json.loads((Path(__file__).parent / "reference" / "r_functions.json").read_text())
CASES = [(key, fit) for key, entry in DOC.items() if key != "versions" for fit in entry["fits"]]


@pytest.mark.parametrize("key, ref", CASES, ids=[f"{k}-{f['name']}" for k, f in CASES])
def test_lme4s_optimum_coefficients_and_predictions(key, ref):
    data = pd.DataFrame(DOC[key]["data"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (singular fits)
        fit = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
    assert fit.llf >= ref["logLik"] - 1e-7 * abs(ref["logLik"])
    assert fit.llf == pytest.approx(ref["logLik"], rel=1e-7)
    np.testing.assert_allclose(
        fit.fe_params.to_numpy(), ref["beta"], rtol=2e-5, atol=1e-6 * np.max(np.abs(ref["beta"]))
    )
    if "predicted" in ref:
        new = pd.DataFrame(ref["newdata"])
        predicted = fit.predict(new, include_random=False).to_numpy()
        np.testing.assert_allclose(predicted, ref["predicted"], rtol=1e-6)
        # the transforms' state (knots, the resolved baseline) survives pickling
        np.testing.assert_allclose(pickle.loads(pickle.dumps(fit)).predict(new, include_random=False), predicted)


def test_ifelse_and_pmax_write_the_same_broken_stick():
    data = pd.DataFrame(DOC["sleepstudy"]["data"])
    a = sparsemix.lmer("Reaction ~ Days + ifelse(Days > 4, Days - 4, 0) + (Days | Subject)", data)
    b = sparsemix.lmer("Reaction ~ Days + pmax(Days - 4, 0) + (Days | Subject)", data)
    assert a.llf == pytest.approx(b.llf, rel=1e-12)


def test_relevel_keeps_the_fitted_baseline_on_new_data_without_it():
    """A position (R's relevel(f, 2)) is resolved on the fitted data: new data lacking that level, or others, gets
    the same columns."""
    data = pd.DataFrame(DOC["Orthodont"]["data"])
    fit = sparsemix.lmer("distance ~ relevel(factor(age), 2) + Sex + (1 | Subject)", data)
    by_name = sparsemix.lmer('distance ~ relevel(factor(age), "10") + Sex + (1 | Subject)', data)
    assert by_name.llf == pytest.approx(fit.llf, rel=1e-12)
    new = pd.DataFrame({"age": [14, 12], "Sex": ["Male", "Female"]})
    expected = fit.fe_params.iloc[0] + fit.fe_params.iloc[[3, 2]].to_numpy() + [fit.fe_params.iloc[4], 0.0]
    np.testing.assert_allclose(fit.predict(new, include_random=False), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "formula, message",
    [
        ('distance ~ relevel(factor(age), "9") + (1 | Subject)', r"'9' is not a level of f; its levels are '8', '10'"),
        ("distance ~ relevel(factor(age), 5) + (1 | Subject)", r"a position among f's 4 levels, 1 to 4"),
        ("distance ~ ns(age) + (1 | Subject)", r"ns\(\): give df .* or knots"),
        ("distance ~ ns(age, df = 0) + (1 | Subject)", r"df must be a whole number of columns, 1 or more; got 0"),
        ("distance ~ bs(age, df = 2) + (1 | Subject)", r"df=2 is fewer columns .* at least 3"),
        (
            "distance ~ ns(age, df = 1000000000) + (1 | Subject)",
            r"999999999 interior knots, but x has 4 distinct values",
        ),
        ("distance ~ ns(age, knots = c(8, 11)) + (1 | Subject)", r"knots must lie inside the boundary knots"),
        ("distance ~ ns(Sex, 2) + (1 | Subject)", r"ns\(\) takes a numeric column"),
        ("distance ~ I(age %in%) + (1 | Subject)", r"%in% needs a value on each side"),
    ],
)
def test_r_functions_say_what_is_wrong(formula, message):
    data = pd.DataFrame(DOC["Orthodont"]["data"])
    with pytest.raises(FormulaError, match=message):
        sparsemix.lmer(formula, data)


def test_boundary_knots_as_r_writes_them():
    """ns(x, knots, Boundary.knots = c(a, b)) (R's dotted keyword): the basis past the data's range is the spline's,
    not its linear extension; the fitted columns span the model given by those knots."""
    data = pd.DataFrame(DOC["sleepstudy"]["data"])
    wide = sparsemix.lmer("Reaction ~ ns(Days, knots = c(3, 6), Boundary.knots = c(-1, 10)) + (1 | Subject)", data)
    plain = sparsemix.lmer("Reaction ~ ns(Days, knots = c(3, 6)) + (1 | Subject)", data)
    assert np.isfinite(wide.llf) and wide.llf != pytest.approx(plain.llf, rel=1e-9)
    assert len(wide.fe_params) == len(plain.fe_params) == 4
