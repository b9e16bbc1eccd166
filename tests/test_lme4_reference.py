"""Fits compared with lme4 1.1-31 (fixtures written by tests/reference/lme4_fixtures.R; R is not needed here).

Each lme4 model is written in statsmodels' vocabulary: a nested random intercept is exog_re plus a
variance component within groups; crossed factors are variance components in one group; `(Days || Subject)`
is `re_formula="1 + Days"` with `free` fixing the correlation at zero.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference, reference_fit

import sparsemix as sm
from sparsemix.datasets import seed_datasets

_fixture = load_reference
_fit_record = reference_fit


def _frame(doc):
    return pd.DataFrame(doc["data"])


@pytest.fixture(scope="module")
def seed():
    return seed_datasets()


def _varcorr(record, grp, var1, var2=None):
    for row in record["varcorr"]:
        if row["grp"] == grp and row["var1"] == var1 and row["var2"] == var2:
            return row["vcov"]
    raise KeyError((grp, var1, var2))


def _check_common(res, record, fe_names):
    # Our optimum must be at least as good as lme4's.
    assert res.llf >= record["logLik"] - 1e-6 * abs(record["logLik"])
    assert res.nobs == record["nobs"]
    lme4_beta = [record["beta"][n] for n in fe_names]
    np.testing.assert_allclose(np.asarray(res.fe_params), lme4_beta, rtol=1e-4, atol=1e-6 * max(map(abs, lme4_beta)))
    np.testing.assert_allclose(np.asarray(res.bse_fe), [record["se_beta"][n] for n in fe_names], rtol=1e-3)
    assert res.scale == pytest.approx(_varcorr(record, "Residual", None), rel=1e-3)


def _fit(model, reml, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SingularFitWarning)
        return model.fit(reml=reml, **kw)


@pytest.mark.parametrize("fit_name", ["reml", "ml"])
def test_seed_nested(seed, fit_name):
    _, record = _fit_record("seed_nested", fit_name)
    model = sm.MixedLM.from_formula(
        "y ~ 1", re_formula="1", vc_formula={"group2": "0 + C(group2)"}, groups="group1", data=seed[0]
    )
    res = _fit(model, fit_name == "reml")
    _check_common(res, record, ["(Intercept)"])
    assert res.cov_re.iloc[0, 0] == pytest.approx(_varcorr(record, "group1", "(Intercept)"), rel=1e-3)
    assert res.vcomp[0] == pytest.approx(_varcorr(record, "group1:group2", "(Intercept)"), rel=1e-3)


@pytest.mark.parametrize("fit_name", ["reml", "ml"])
def test_seed_crossed(seed, fit_name):
    _, record = _fit_record("seed_crossed", fit_name)
    df = seed[1]
    model = sm.MixedLM.from_formula(
        "y ~ 1", groups=np.ones(len(df)), vc_formula={"group1": "0 + C(group1)", "group2": "0 + C(group2)"}, data=df
    )
    res = _fit(model, fit_name == "reml")
    _check_common(res, record, ["(Intercept)"])
    np.testing.assert_allclose(
        res.vcomp, [_varcorr(record, "group1", "(Intercept)"), _varcorr(record, "group2", "(Intercept)")], rtol=1e-3
    )


def _sleepstudy_model(doc):
    return sm.MixedLM.from_formula("Reaction ~ Days", re_formula="1 + Days", groups="Subject", data=_frame(doc))


def _check_ranef(res, record, factor, names, group_of_level=lambda level: level):
    ref = record["ranef"][factor]
    values = np.array(ref["values"])
    condsd = np.array(ref["condsd"])
    ours = np.array([[res.random_effects[group_of_level(lv)][n] for n in names(lv)] for lv in ref["levels"]])
    sd = np.array(
        [[np.sqrt(res.random_effects_cov[group_of_level(lv)].loc[n, n]) for n in names(lv)] for lv in ref["levels"]]
    )
    np.testing.assert_allclose(ours, values, rtol=1e-3, atol=1e-3 * np.abs(values).max())
    np.testing.assert_allclose(sd, condsd, rtol=1e-3)


@pytest.mark.parametrize("fit_name", ["reml_corr", "ml_corr"])
def test_sleepstudy_correlated_slopes(fit_name):
    doc, record = _fit_record("sleepstudy", fit_name)
    res = _fit(_sleepstudy_model(doc), fit_name.startswith("reml"))
    _check_common(res, record, ["(Intercept)", "Days"])
    cov = res.cov_re.to_numpy()
    np.testing.assert_allclose(
        [cov[0, 0], cov[1, 1], cov[1, 0]],
        [
            _varcorr(record, "Subject", "(Intercept)"),
            _varcorr(record, "Subject", "Days"),
            _varcorr(record, "Subject", "(Intercept)", "Days"),
        ],
        rtol=1e-3,
    )
    _check_ranef(res, record, "Subject", lambda lv: ["Subject", "Days"])


@pytest.mark.parametrize("fit_name", ["reml_uncorr", "ml_uncorr"])
def test_sleepstudy_independent_slopes_via_free(fit_name):
    doc, record = _fit_record("sleepstudy", fit_name)
    free = sm.MixedLMParams.from_components(np.ones(2), np.eye(2))
    res = _fit(_sleepstudy_model(doc), fit_name.startswith("reml"), free=free)
    _check_common(res, record, ["(Intercept)", "Days"])
    cov = res.cov_re.to_numpy()
    assert cov[1, 0] == 0.0
    np.testing.assert_allclose(
        [cov[0, 0], cov[1, 1]],
        [_varcorr(record, "Subject", "(Intercept)"), _varcorr(record, "Subject.1", "Days")],
        rtol=1e-3,
    )
    _check_ranef(res, record, "Subject", lambda lv: ["Subject", "Days"])
    # A parameter held fixed has standard error 0, as in statsmodels.
    assert res.bse["Subject x Days Cov"] == 0.0


@pytest.mark.parametrize("fit_name", ["reml", "ml"])
def test_penicillin_crossed(fit_name):
    doc, record = _fit_record("penicillin", fit_name)
    df = _frame(doc)
    model = sm.MixedLM.from_formula(
        "diameter ~ 1",
        groups=np.ones(len(df)),
        vc_formula={"plate": "0 + C(plate)", "sample": "0 + C(sample)"},
        data=df,
    )
    res = _fit(model, fit_name == "reml")
    _check_common(res, record, ["(Intercept)"])
    np.testing.assert_allclose(
        res.vcomp, [_varcorr(record, "plate", "(Intercept)"), _varcorr(record, "sample", "(Intercept)")], rtol=1e-3
    )
    for factor in ("plate", "sample"):
        _check_ranef(res, record, factor, lambda lv, f=factor: [f"{f}[C({f})[{lv}]]"], group_of_level=lambda lv: 1.0)


def test_dyestuff2_singular_fit_is_reported_not_failed():
    doc, record = _fit_record("dyestuff2", "reml")
    assert record["isSingular"]
    model = sm.MixedLM.from_formula("Yield ~ 1", groups="Batch", data=_frame(doc))
    with pytest.warns(sm.SingularFitWarning, match="Batch"):
        res = model.fit()
    _check_common(res, record, ["(Intercept)"])
    assert res.cov_re.iloc[0, 0] == pytest.approx(0.0, abs=1e-8 * res.scale)
    assert res.fit_result.is_singular
    assert res.converged
    # No normal-theory standard error exists for a variance estimated at zero: NaN, announced by the warning.
    assert np.isnan(res.bse_re.iloc[0])
