"""R's functions in lme4 formulas (splines' ns() and bs(), relevel(), cut(), ifelse(), pmin()/pmax(), %in% with c())
read as R reads them: lme4's optimum, its coefficients column by column (their names are patsy's), and its
population-level predictions on new data (the splines' knots and cut's breaks kept from the fitted data; new values
past the knots extrapolated as R does). Fixtures: tests/reference/r_functions_fixtures.R."""

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
    if ref["name"].startswith("cut"):  # R's interval labels, in R's order (patsy's names around them)
        ours = [name.rsplit("[T.", 1)[-1][:-1] for name in fit.fe_params.index if "[T." in name]
        theirs = [name for name in ref["beta_names"] if name.startswith("cut(")]
        assert len(ours) == len(theirs) and all(r.endswith(o) for o, r in zip(ours, theirs)), (ours, theirs)
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
        ("distance ~ cut(age, 1) + (1 | Subject)", r"a number of intervals must be a whole number, 2 or more; got 1"),
        ("distance ~ cut(age, c(8, 8, 14)) + (1 | Subject)", r"the breaks must be distinct numbers"),
        ("distance ~ cut(age, c(9, 12, 14)) + (1 | Subject)", r"8.0 \(and 26 more\) lie outside the breaks"),
        ('distance ~ cut(age, c(0, 10, 20), labels = c("young")) + (1 | Subject)', r"2 distinct labels are needed"),
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


def test_cut_keeps_its_breaks_and_labels_for_new_data():
    """cut(x, n) places its breaks on the fitted data; new data outside them is an error that says where (R: NA)."""
    data = pd.DataFrame(DOC["Orthodont"]["data"])
    fit = sparsemix.lmer('distance ~ cut(age, 3, labels = c("a", "b", "c")) + (1 | Subject)', data)
    assert list(fit.fe_params.index)[1:] == [
        'cut(age, 3, labels=c("a", "b", "c"))[T.b]',
        'cut(age, 3, labels=c("a", "b", "c"))[T.c]',
    ]
    new = pd.DataFrame({"age": [14.0, 8.0]})
    expected = fit.fe_params.iloc[0] + np.array([fit.fe_params.iloc[2], 0.0])
    np.testing.assert_allclose(fit.predict(new, include_random=False), expected, rtol=1e-12)
    with pytest.raises(
        sparsemix.InputError, match=r"cut\(\): 30.0 lies outside the breaks \[7.994, 10.0, 12.0, 14.006\]"
    ):
        fit.predict(pd.DataFrame({"age": [30.0]}), include_random=False)
