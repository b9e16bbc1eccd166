"""The parts of statsmodels' MixedLM surface that its own test suite exercises (test_statsmodels_suite.py), checked
here against statsmodels' numbers, lme4's, or closed forms: model.data, summary tables, the likelihood surface
(loglike following the last fit, score, hessian), fit_regularized, the warnings, t_test, get_distribution,
remove_data and summary_col.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import sparsemix
from sparsemix.statsmodels.model import UnusedArgumentWarning

sm_lme = pytest.importorskip("statsmodels.regression.mixed_linear_model")
from statsmodels.base import _penalties as penalties  # noqa: E402
from statsmodels.iolib.summary2 import summary_col  # noqa: E402

SM_RESULTS = Path(sm_lme.__file__).parent / "tests" / "results"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _ours(pa) -> sparsemix.MixedLMParams:
    return sparsemix.MixedLMParams.from_components(
        np.asarray(pa.fe_params, dtype=float), np.asarray(pa.cov_re), vcomp=np.asarray(pa.vcomp, dtype=float)
    )


@pytest.fixture(scope="module")
def dietox():
    return pd.read_csv(SM_RESULTS / "dietox.csv")


# -- the likelihood follows the fit ------------------------------------------------------------------------


def test_loglike_follows_the_method_of_the_last_fit(dietox):
    """Issue 13: after fit(reml=False), model.loglike returned the REML value (-2404.778, not lme4's -2402.932)."""
    model = sparsemix.MixedLM.from_formula("Weight ~ Time", groups="Pig", data=dietox)
    theirs = sm_lme.MixedLM.from_formula("Weight ~ Time", groups="Pig", data=dietox)
    assert model.reml is True  # statsmodels' default before any fit
    reml_fit = model.fit()
    assert model.loglike(reml_fit.params_object) == pytest.approx(-2404.775, rel=1e-6)  # lme4's logLik (REML)
    ml_fit = model.fit(reml=False)
    assert model.reml is False
    pa = ml_fit.params_object
    assert model.loglike(pa) == pytest.approx(-2402.932, rel=1e-6)  # lme4's logLik (ML)
    assert model.loglike(pa) == pytest.approx(ml_fit.llf, rel=1e-12)
    assert model.loglike(pa, profile_fe=False) == pytest.approx(ml_fit.llf, rel=1e-12)  # fe at the optimum
    _quiet(theirs.fit, reml=False)
    their_pa = sm_lme.MixedLMParams.from_components(pa.fe_params, pa.cov_re, vcomp=pa.vcomp)
    assert model.loglike(pa) == pytest.approx(theirs.loglike(their_pa), rel=1e-11)
    # the REML criterion at the same point, on request and as statsmodels computes it
    theirs.reml = True
    assert model.loglike(pa, reml=True) == pytest.approx(theirs.loglike(their_pa), rel=1e-11)
    assert model.loglike(pa, reml=True) < reml_fit.llf


def _slopes_and_vc(use_sqrt):
    rs = np.random.RandomState(12)
    n_groups, size = 60, 6
    n = n_groups * size
    X = np.column_stack([np.ones(n), rs.normal(size=(n, 2))])
    Z = np.column_stack([np.ones(n), rs.normal(size=n)])
    g = np.repeat(np.arange(n_groups), size)
    slopes = rs.normal(size=(n_groups, 2)) * [1.0, 0.5]
    z_vc = rs.normal(size=n)
    y = (
        X @ [1, 0.5, -0.3]
        + (slopes[g] * Z).sum(1)
        + 0.7 * z_vc * np.repeat(rs.normal(size=n_groups), size)
        + rs.normal(size=n)
    )
    mats = [[z_vc[g == k][:, None] for k in range(n_groups)]]
    names = [[["v"] for _ in range(n_groups)]]
    ours = sparsemix.MixedLM(y, X, g, exog_re=Z, exog_vc=sparsemix.VCSpec(["v"], names, mats), use_sqrt=use_sqrt)
    theirs = sm_lme.MixedLM(y, X, g, exog_re=Z, exog_vc=sm_lme.VCSpec(["v"], names, mats), use_sqrt=use_sqrt)
    return ours, theirs


@pytest.mark.parametrize("use_sqrt", [True, False])
@pytest.mark.parametrize("reml", [True, False])
def test_score_and_hessian_equal_statsmodels_analytic_derivatives(use_sqrt, reml):
    """sparsemix's score and hessian are central differences of its loglike; statsmodels' are analytic."""
    ours, theirs = _slopes_and_vc(use_sqrt)
    ours.fit(reml=reml)
    theirs_fit = _quiet(theirs.fit, reml=reml)

    def point():
        return sm_lme.MixedLMParams.from_components(
            np.array([0.9, 0.4, -0.2]), cov_re=np.array([[1.2, 0.3], [0.3, 0.6]]), vcomp=np.array([0.4])
        )

    for profile_fe in (True, False):
        # (statsmodels' score overwrites fe_params of its argument when profiling: a fresh point each call)
        assert ours.loglike(_ours(point()), profile_fe=profile_fe) == pytest.approx(
            theirs.loglike(point(), profile_fe=profile_fe), rel=1e-12
        )
        np.testing.assert_allclose(
            ours.score(_ours(point()), profile_fe=profile_fe),
            theirs.score(point(), profile_fe=profile_fe),
            rtol=1e-6,
            atol=1e-6,
        )
    # statsmodels' Hessian is that of loglike only where the fixed effects are the GLS ones: at its estimate
    hess, sing = ours.hessian(_ours(theirs_fit.params_object))
    their_hess, their_sing = theirs.hessian(theirs_fit.params_object)
    assert not sing and not their_sing
    np.testing.assert_allclose(hess, their_hess, rtol=1e-4, atol=1e-4 * np.abs(their_hess).max())


def test_score_is_zero_where_free_holds_a_parameter():
    """After fit(free=...), as in statsmodels, the score of the parameters held fixed is zero (here the
    covariance of the two random effects)."""
    ours, theirs = _slopes_and_vc(True)
    ours.fit(free=sparsemix.MixedLMParams.from_components(np.ones(3), np.eye(2), vcomp=np.ones(1)))
    _quiet(theirs.fit, free=sm_lme.MixedLMParams.from_components(np.ones(3), np.eye(2), vcomp=np.ones(1)))
    point = dict(fe_params=np.array([0.9, 0.4, -0.2]), cov_re=np.array([[1.2, 0.3], [0.3, 0.6]]), vcomp=np.array([0.4]))
    for profile_fe in (True, False):
        score = ours.score(sparsemix.MixedLMParams.from_components(**point), profile_fe=profile_fe)
        their_score = theirs.score(sm_lme.MixedLMParams.from_components(**point), profile_fe=profile_fe)
        np.testing.assert_allclose(score, their_score, rtol=1e-6, atol=1e-6)
        assert score[1 if profile_fe else 4] == 0.0 and np.all(np.delete(score, 1 if profile_fe else 4) != 0)


def test_get_fe_params_and_get_scale_equal_statsmodels():
    ours, theirs = _slopes_and_vc(True)
    ours.fit()
    _quiet(theirs.fit)
    cov_re, vcomp = np.array([[1.2, 0.3], [0.3, 0.6]]), np.array([0.4])
    fe, sing = ours.get_fe_params(cov_re, vcomp)
    their_fe, their_sing = theirs.get_fe_params(cov_re, vcomp)
    np.testing.assert_allclose(fe, their_fe, rtol=1e-10)
    assert sing == their_sing is False
    assert ours.get_scale(fe + 0.1, cov_re, vcomp) == pytest.approx(
        theirs.get_scale(fe + 0.1, cov_re, vcomp), rel=1e-10
    )


# -- model.data and the summary's tables ------------------------------------------------------------------


def test_model_data_names_as_statsmodels(dietox):
    kw = dict(groups="Pig", re_formula="1 + Time", vc_formula={"ev": "0 + C(Evit)"})
    ours = sparsemix.MixedLM.from_formula("Weight ~ Time + Cu", data=dietox, **kw)
    theirs = sm_lme.MixedLM.from_formula("Weight ~ Time + Cu", data=dietox, **kw)
    for name in ("ynames", "xnames", "param_names", "exog_re_names", "exog_re_names_full", "vcomp_names"):
        assert getattr(ours.data, name) == getattr(theirs.data, name), name
    assert ours.data.ynames == "Weight" and ours.data.xnames == ["Intercept", "Time", "Cu"]
    assert ours.data.frame is dietox
    assert list(ours.data.row_labels) == list(theirs.data.row_labels)
    assert ours.data.const_idx == 0 and ours.data.k_constant == 1
    # the array constructor
    rs = np.random.RandomState(0)
    X, Z = rs.normal(size=(30, 2)), rs.normal(size=(30, 2))
    y, g = rs.normal(size=30), np.repeat(np.arange(6), 5)
    ours, theirs = sparsemix.MixedLM(y, X, g, exog_re=Z), sm_lme.MixedLM(y, X, g, exog_re=Z)
    for name in ("ynames", "xnames", "param_names", "exog_re_names", "exog_re_names_full"):
        assert getattr(ours.data, name) == getattr(theirs.data, name), name
    assert ours.data.orig_exog is X and ours.data.row_labels is None


def test_summary_tables_as_statsmodels(dietox):
    ours = sparsemix.MixedLM.from_formula("Weight ~ Time", groups="Pig", data=dietox).fit()
    theirs = _quiet(sm_lme.MixedLM.from_formula("Weight ~ Time", groups="Pig", data=dietox).fit)
    ts, tt = ours.summary().tables, theirs.summary().tables
    assert ts[0].shape == tt[0].shape == (6, 4)
    assert ts[0][0].tolist() == tt[0][0].tolist() and ts[0][2].tolist() == tt[0][2].tolist()  # the keys
    assert ts[0][1].tolist()[:3] == ["MixedLM", "861", "72"]
    assert list(ts[1].index) == list(tt[1].index) == ["Intercept", "Time", "Pig Var"]
    assert list(ts[1].columns) == list(tt[1].columns)
    # fixed-effect rows agree with statsmodels (and lme4) to the printed 3 decimals
    assert ts[1].loc[["Intercept", "Time"]].values.tolist() == tt[1].loc[["Intercept", "Time"]].values.tolist()
    assert ts[1].loc["Pig Var", "Coef."] == tt[1].loc["Pig Var", "Coef."] == "40.394"  # lme4: 40.39395
    assert ts[1].loc["Pig Var", "z"] == ""  # blank, as statsmodels
    html = ours.summary().as_html()
    assert html.count("<table") == 2 and "<th>Pig Var</th>" in html and "40.394" in html


# -- fit_regularized --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lasso_data():
    """statsmodels' test_regularized data: y = x0 - x2 + group effect + noise, 100 groups of 4."""
    rs = np.random.RandomState(3453)
    exog = rs.normal(size=(400, 5))
    groups = np.kron(np.arange(100), np.ones(4))
    endog = exog[:, 0] - exog[:, 2] + np.kron(rs.normal(size=100), np.ones(4)) + rs.normal(size=400)
    return endog, exog, groups


@pytest.mark.parametrize("alpha", [1.0, 10.0 * np.ones(5), 100.0], ids=["1", "10-vector", "100"])
@pytest.mark.parametrize("reml", [True, False])
def test_l1_fit_regularized_equals_statsmodels(lasso_data, alpha, reml):
    ours = sparsemix.MixedLM(*lasso_data).fit_regularized(alpha=alpha, reml=reml)
    theirs = _quiet(sm_lme.MixedLM(*lasso_data).fit_regularized, alpha=alpha, reml=reml)
    # the same coefficients to the precision of statsmodels' unpenalized fit, the same zeros
    np.testing.assert_allclose(ours.fe_params, theirs.fe_params, atol=2e-6)
    np.testing.assert_array_equal(ours.fe_params == 0, theirs.fe_params == 0)
    # (statsmodels' REML optimum is 1e-8 below sparsemix's in llf; its cov_re 2.4e-5 from it)
    assert ours.scale == pytest.approx(theirs.scale, rel=2e-5)
    np.testing.assert_allclose(ours.cov_re, theirs.cov_re, rtol=5e-5)
    # standard errors only for the coefficients that are not zero
    np.testing.assert_array_equal(np.isnan(ours.bse_fe), ours.fe_params == 0)


def test_l1_solution_satisfies_the_lasso_optimality_conditions(lasso_data):
    """(b - b_gls)' G (b - b_gls) + sum alpha |b| with G = X'V^-1X: 2 G (b - b_gls) + alpha sign(b) = 0 where
    b != 0, |2 G (b - b_gls)| <= alpha where b = 0."""
    alpha = np.array([30.0, 30.0, 30.0, 5.0, 60.0])
    model = sparsemix.MixedLM(*lasso_data)
    unpenalized = model.fit()
    result = model.fit_regularized(alpha=alpha, ptol=1e-12, maxit=10_000)
    G = np.linalg.inv(unpenalized.fit_result.cov_beta)
    grad = 2 * G @ (result.fe_params - unpenalized.fe_params)
    nonzero = result.fe_params != 0
    assert nonzero.tolist() == [True, False, True, True, False]
    np.testing.assert_allclose(grad[nonzero], -alpha[nonzero] * np.sign(result.fe_params[nonzero]), rtol=1e-8)
    assert np.all(np.abs(grad[~nonzero]) <= alpha[~nonzero])
    # the scale is re-estimated at the penalized coefficients, the covariance held (statsmodels' get_scale)
    assert result.scale == pytest.approx(
        model.get_scale(result.fe_params, unpenalized.cov_re_unscaled, unpenalized.vcomp / unpenalized.scale), rel=1e-12
    )
    np.testing.assert_allclose(result.cov_re, unpenalized.cov_re)


def test_fit_regularized_without_penalty_is_the_fit(lasso_data):
    model = sparsemix.MixedLM(*lasso_data)
    fit, free = model.fit(), model.fit_regularized()
    np.testing.assert_allclose(free.fe_params, fit.fe_params, rtol=1e-9)
    assert free.llf == pytest.approx(fit.llf, rel=1e-12)
    assert free.scale == pytest.approx(fit.scale, rel=1e-10)
    np.testing.assert_allclose(free.bse_fe, fit.bse_fe, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(free.fittedvalues), np.asarray(fit.fittedvalues), rtol=1e-9)


def test_smooth_penalty_maximizes_the_penalized_likelihood(lasso_data):
    """An L2 penalty shrinks the fixed effects (statsmodels' own fit_regularized leaves them at the GLS values):
    at the result, d/dbeta [loglike(beta) - alpha |beta|^2] = 0 with the covariance held."""
    model = sparsemix.MixedLM(*lasso_data)
    unpenalized = model.fit()
    penalty = penalties.L2()
    result = model.fit_regularized(method=penalty, alpha=10.0)
    assert penalty.alpha == 10.0  # statsmodels sets the weight the same way
    beta, beta_hat = result.fe_params, unpenalized.fe_params
    assert np.linalg.norm(beta) < 0.97 * np.linalg.norm(beta_hat)
    G_rel = np.linalg.inv(unpenalized.fit_result.cov_beta) * unpenalized.scale
    r = beta - beta_hat
    qf = (400 - 5) * unpenalized.scale + r @ G_rel @ r
    gradient = -(400 - 5) * G_rel @ r / qf - 2 * 10.0 * beta
    np.testing.assert_allclose(gradient, 0.0, atol=1e-5)
    assert result.scale == pytest.approx(qf / (400 - 5), rel=1e-10)


def test_fit_regularized_bad_input(lasso_data):
    model = sparsemix.MixedLM(*lasso_data)
    with pytest.raises(sparsemix.InputError, match="Invalid regularization method 'l2'"):
        model.fit_regularized(method="l2")
    with pytest.raises(sparsemix.InputError, match="vector of 5 non-negative weights"):
        model.fit_regularized(alpha=np.ones(3))
    with pytest.raises(sparsemix.InputError, match="penalty object with func"):
        model.fit_regularized(method=object())


# -- warnings ---------------------------------------------------------------------------------------------


def test_dict_variance_components_warn_as_statsmodels():
    rs = np.random.RandomState(1)
    g = np.repeat(np.arange(10), 4)
    vc = {"a": {k: rs.normal(size=(4, 1)) for k in range(10)}}
    with pytest.warns(FutureWarning, match="Using deprecated variance components format"):
        sparsemix.MixedLM(rs.normal(size=40), np.ones((40, 1)), g, exog_vc=vc)


def test_fit_keywords_statsmodels_never_used_warn_as_statsmodels():
    rs = np.random.RandomState(456)
    g = np.repeat(np.arange(5), 10)
    x = rs.normal(size=50)
    model = sparsemix.MixedLM.from_formula(
        "y ~ x", pd.DataFrame({"y": x + rs.normal(size=50), "x": x, "g": g}), groups="g"
    )
    with pytest.warns(UnusedArgumentWarning, match="Argument cov_type not used by MixedLM.fit") as caught:
        result = model.fit(cov_type="hc1")
    assert issubclass(caught[0].category, FutureWarning) and issubclass(
        caught[0].category, sparsemix.IgnoredArgumentWarning
    )
    assert result.converged and result.fe_params.shape == (2,)
    # a keyword statsmodels passes to scipy: accepted by both, unused by sparsemix, no FutureWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(ftol=1e-9)
    assert [w.category for w in caught] == [sparsemix.IgnoredArgumentWarning]


def test_singular_covariance_warns():
    """A random intercept whose REML estimate is zero (statsmodels' test_formulas, model 4; lme4 gives 0 too)."""
    rs = np.random.RandomState(2410)
    exog = rs.normal(size=(300, 4))
    exog_re = rs.normal(size=300)
    groups = np.kron(np.arange(100), [1, 1, 1])
    endog = exog.sum(1) + exog_re * np.kron(rs.normal(size=100), [1, 1, 1]) + rs.normal(size=300)
    model = sparsemix.MixedLM(endog, exog, groups, np.ones(300))
    with pytest.warns(
        sparsemix.SingularFitWarning,
        match=r"The random effects covariance matrix is singular: "
        r"boundary \(singular\) fit: x_re1 estimated at zero",
    ):
        result = model.fit()
    assert result.cov_re[0, 0] == 0.0
    hess, sing = model.hessian(result.params_object)
    assert sing


# -- t_test, predict, get_distribution, remove_data, summary_col ------------------------------------------


def test_t_test_of_fixed_effects():
    rs = np.random.RandomState(12345)
    groups = np.repeat(np.arange(30), 10)
    exog = np.column_stack([np.ones(300), rs.standard_normal((300, 2))])
    endog = exog @ [1.0, 0.5, -0.5] + 0.5 * rs.standard_normal(30)[groups] + 0.5 * rs.standard_normal(300)
    res = sparsemix.MixedLM(endog, exog, groups).fit()
    theirs = _quiet(sm_lme.MixedLM(endog, exog, groups).fit)
    R = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0]])
    ours_t, their_t = res.t_test(R), theirs.t_test(R)
    np.testing.assert_allclose(ours_t.effect, their_t.effect, rtol=1e-6)
    np.testing.assert_allclose(ours_t.sd, np.sqrt(np.diag(R @ res.cov_params()[:3, :3] @ R.T)), rtol=1e-12)
    np.testing.assert_allclose(ours_t.sd, their_t.sd, rtol=2e-3)  # GLS vs statsmodels' Hessian
    np.testing.assert_allclose(ours_t.pvalue, 2 * stats.norm.sf(np.abs(ours_t.tvalue)))
    t_ref = res.t_test(R, use_t=True)
    assert t_ref.df_denom == 297 and np.all(t_ref.pvalue > ours_t.pvalue)
    with pytest.raises(ValueError, match="should have 3 columns"):
        res.t_test(np.eye(4))


def test_model_predict_takes_params_in_every_form():
    rs = np.random.RandomState(2024)
    groups = np.repeat(np.arange(8), 12)
    exog = np.column_stack([np.ones(96), rs.standard_normal((96, 2))])
    endog = exog @ [1.0, 0.5, -0.5] + rs.standard_normal(8)[groups] + rs.standard_normal(96)
    mod = sparsemix.MixedLM(endog, exog, groups)
    res = mod.fit()
    expected = exog @ res.fe_params
    for params in (res.params, res.params_object, res.fe_params):
        np.testing.assert_allclose(mod.predict(params), expected, rtol=1e-12)
    np.testing.assert_allclose(mod.predict(res.params, exog=exog[:5]), expected[:5], rtol=1e-12)
    with pytest.raises(sparsemix.InputError, match="3 columns"):
        mod.predict(res.params, exog=exog[:, :2])


def test_simulation_makes_statsmodels_draws():
    """get_distribution(params, scale).rvs: for the same generator, the same values as statsmodels."""
    rs = np.random.RandomState(234)
    n = 100
    df = pd.DataFrame(rs.normal(size=(n, 10)), columns=["y", "x1", "x2", "z0", "z1", "z2", "z3", "z4", "z5", "_"])
    df["grp"] = np.repeat(np.arange(10), 10)
    kw = dict(groups="grp", re_formula="0 + z0 + z1", vc_formula={"a": "0 + z2 + z3", "b": "0 + z4 + z5"}, data=df)
    ours, theirs = (cls.from_formula("y ~ 0 + x1 + x2", **kw) for cls in (sparsemix.MixedLM, sm_lme.MixedLM))
    params = np.r_[1.0, -2.0, 1.0, 0.5, 2.0, 0.25, 2.25] / np.r_[1, 1, 1.5, 1.5, 1.5, 1.5, 1.5]
    draws = [m.get_distribution(params, 1.5, None).rvs(0, rng=np.random.RandomState(7)) for m in (ours, theirs)]
    np.testing.assert_allclose(draws[0], draws[1], rtol=1e-12)
    again = ours.get_distribution(params, 1.5, None).rvs(0, rng=7)
    assert again.shape == (n,) and np.all(np.isfinite(again))


def test_remove_data_keeps_the_report_and_pickles():
    rs = np.random.RandomState(2)
    g = np.repeat(np.arange(20), 6)
    X = np.column_stack([np.ones(120), rs.normal(size=120)])
    y = X @ [1.0, 2.0] + np.repeat(rs.normal(size=20), 6) + rs.normal(size=120)
    res = sparsemix.MixedLM(y, X, g).fit()
    text, bse, t = res.summary().as_text(), np.asarray(res.bse), res.t_test(np.eye(2)).pvalue
    res.remove_data()
    assert res.model.endog is None and res.model.data.exog is None
    restored = pickle.loads(pickle.dumps(res))
    assert restored.summary().as_text() == text
    np.testing.assert_array_equal(restored.bse, bse)
    np.testing.assert_array_equal(restored.t_test(np.eye(2)).pvalue, t)
    with pytest.raises(sparsemix.InputError, match="remove_data"):
        restored.fittedvalues
    with pytest.raises(sparsemix.InputError, match="remove_data"):
        restored.random_effects


def test_summary_col_with_lme4_standard_errors():
    """statsmodels' summary_col on sparsemix's results (statsmodels' test_summary_col, whose table asserts
    statsmodels' own fixed-effect standard errors). Here the standard errors are lme4's: vcov() gives 1.485426,
    0.164687 (Y ~ X) and 1.439755, 0.131773 (X ~ Y); the coefficients and Group Var (0.80559 / 4.12139 and
    2.7751 / 2.0031) are lme4's and statsmodels'."""
    y = [1.727, -1.037, 2.904, 3.569, 4.629, 5.736, 6.747, 7.020, 5.624, 10.155, 10.400, 17.164, 17.276, 14.988, 14.453]
    d = pd.DataFrame({"Y": y, "X": np.arange(1, 16), "IDS": [1] * 5 + [2] * 4 + [3] * 6})
    results = [sparsemix.MixedLM.from_formula(f, d, groups=d["IDS"]).fit() for f in ("Y ~ X", "X ~ Y")]
    out = summary_col(results, stars=True, regressor_order=["Group Var", "Intercept", "X", "Y"])
    assert str(out) == (
        "\n=============================\n              Y         X    \n"
        "-----------------------------\nGroup Var 0.1955    1.3854   \n"
        "          (0.6032)  (2.7377) \nIntercept -1.2672   3.4842** \n"
        "          (1.4854)  (1.4398) \nX         1.1618***          \n"
        "          (0.1647)           \nY                   0.5529***\n"
        "                    (0.1318) \n=============================\n"
        "Standard errors in\nparentheses.\n* p<.1, ** p<.05, ***p<.01"
    )


@pytest.mark.parametrize(
    "statsmodels_args, lme4_formula",
    [
        (
            ("Reaction ~ Days", "sleepstudy", {"groups": "Subject", "re_formula": "~Days"}),
            "Reaction ~ Days + (Days | Subject)",
        ),
        (("Yield ~ 1", "dyestuff", {"groups": "Batch"}), "Yield ~ 1 + (1 | Batch)"),
    ],
)
def test_the_statsmodels_door_starts_where_lmer_starts(statsmodels_args, lme4_formula):
    """The default start is chosen once, for every door (pipeline.fit_system: the levels' moments, the variance
    components' moments): MixedLM's fit takes lmer's evaluations (1 on these balanced designs, where lme4's start
    took 5-10) to the same optimum."""
    from conftest import reference_data

    formula, name, kwargs = statsmodels_args
    data = reference_data(name)
    ours = sparsemix.MixedLM.from_formula(formula, data, **kwargs).fit()
    lme4_door = sparsemix.lmer(lme4_formula, data)
    assert ours.fit_result.optimization.n_evaluations == lme4_door.n_evaluations == 1
    np.testing.assert_allclose(ours.fit_result.theta, lme4_door.fit_result.theta, rtol=1e-10)
    assert ours.llf == pytest.approx(lme4_door.llf, rel=1e-12)


def test_the_fixed_design_frames_are_patsys():
    """fixed_design builds its matrices as the lme4 door does (kept designs) and labels them as patsy's dataframes:
    the data's index (not 0..n-1), patsy's column names, the response's name, the same numbers."""
    import patsy

    from sparsemix.formula.mixedlm import fixed_design
    from sparsemix.formula.safety import safe_environment

    rng = np.random.default_rng(4)
    data = pd.DataFrame(
        {"y": rng.normal(size=12), "x": rng.normal(size=12), "f": list("abc") * 4}, index=np.arange(100, 124, 2)
    )
    endog, exog, info = fixed_design("y ~ x * f", data, safe_environment())
    y, X = patsy.dmatrices("y ~ x * f", data, return_type="dataframe")
    pd.testing.assert_frame_equal(exog, X)
    pd.testing.assert_series_equal(endog, y.iloc[:, 0])
    assert info.column_names == X.design_info.column_names
