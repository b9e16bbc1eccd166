"""The statsmodels-shaped surface: parameter packing, profiles, predictions, conditional covariances."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sparsemix as sm


@pytest.fixture(scope="module")
def slopes_df():
    rng = np.random.default_rng(11)
    n_groups, per = 40, 12
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=g.size)
    u = rng.multivariate_normal([0, 0], [[4.0, 1.0], [1.0, 1.0]], size=n_groups)
    y = 2 + 0.5 * x + u[g, 0] + u[g, 1] * x + 3 * rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g, "sub": np.tile(np.arange(3), g.size // 3)})


@pytest.fixture(scope="module")
def slopes_fit(slopes_df):
    return sm.MixedLM.from_formula(
        "y ~ x", re_formula="1 + x", vc_formula={"sub": "0 + C(sub)"}, groups="g", data=slopes_df
    ).fit()


def test_from_packed_follows_statsmodels_layout():
    packed = np.array([10.0, 20.0, 1, 2, 3, 4, 5, 6, 7])
    plain = sm.MixedLMParams.from_packed(packed, k_fe=2, k_re=3, use_sqrt=False, has_fe=True)
    np.testing.assert_array_equal(plain.fe_params, [10, 20])
    np.testing.assert_array_equal(plain.cov_re, [[1, 2, 4], [2, 3, 5], [4, 5, 6]])
    np.testing.assert_array_equal(plain.vcomp, [7])
    root = sm.MixedLMParams.from_packed(packed, k_fe=2, k_re=3, use_sqrt=True, has_fe=True)
    L = np.array([[1, 0, 0], [2, 3, 0], [4, 5, 6.0]])
    np.testing.assert_array_equal(root.cov_re, L @ L.T)
    np.testing.assert_array_equal(root.vcomp, [49])
    np.testing.assert_allclose(root.get_packed(use_sqrt=True, has_fe=True), packed)
    assert (root.k_fe, root.k_re, root.k_re2, root.k_vc, root.k_tot) == (2, 3, 6, 1, 9)


def test_get_packed_falls_back_to_diagonal_root_when_not_positive_definite():
    pa = sm.MixedLMParams.from_components(cov_re=np.array([[4.0, 3.0], [3.0, 1.0]]), vcomp=np.array([9.0]))
    np.testing.assert_array_equal(pa.get_packed(use_sqrt=True), [2.0, 0.0, 1.0, 3.0])


def test_params_layout_and_scaling(slopes_fit):
    r = slopes_fit
    assert list(r.params.index) == ["Intercept", "x", "g Var", "g x x Cov", "x Var", "sub Var"]
    cov = r.cov_re.to_numpy()
    np.testing.assert_allclose(r.params.iloc[2:5], cov[np.tril_indices(2)] / r.scale, rtol=1e-12)
    np.testing.assert_allclose(r.params.iloc[5], r.vcomp[0] / r.scale, rtol=1e-12)
    np.testing.assert_allclose(r.cov_re_unscaled.to_numpy(), cov / r.scale, rtol=1e-12)
    ci = r.conf_int()
    np.testing.assert_allclose(ci[1] - ci[0], 2 * 1.959963984540054 * r.bse, rtol=1e-9)
    np.testing.assert_allclose(r.tvalues, r.params / r.bse, rtol=1e-12)


def test_delta_method_links_bse_and_bse_re(slopes_fit):
    # bse (of parameter / scale) follows from the joint covariance of (variances, scale) by the delta method;
    # when scale's uncertainty is small, bse * scale is close to bse_re.
    r = slopes_fit
    np.testing.assert_allclose(np.asarray(r.bse)[2:] * r.scale, np.asarray(r.bse_re), rtol=0.1)


def test_default_optimizer_is_at_least_as_good_as_the_alternatives(slopes_df, slopes_fit):
    model = sm.MixedLM.from_formula(
        "y ~ x", re_formula="1 + x", vc_formula={"sub": "0 + C(sub)"}, groups="g", data=slopes_df
    )
    restarted = model.fit(start_params=slopes_fit.params_object)
    assert restarted.llf == pytest.approx(slopes_fit.llf, abs=1e-6)
    for method in ("lbfgs", ["powell"], "nm"):
        # L-BFGS-B with finite differences stops early on this model's boundary (x Var -> 0): -1275.16 vs
        # -1274.01 when this test was written. Every alternative must be no better than the default.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sm.SingularFitWarning)
            assert model.fit(method=method).llf <= slopes_fit.llf + 1e-6, method


def test_unbounded_methods_warn_and_use_bobyqa(slopes_df, slopes_fit):
    model = sm.MixedLM.from_formula(
        "y ~ x", re_formula="1 + x", vc_formula={"sub": "0 + C(sub)"}, groups="g", data=slopes_df
    )
    with pytest.warns(sm.IgnoredArgumentWarning, match="BOBYQA"):
        r = model.fit(method="bfgs")
    assert r.llf == pytest.approx(slopes_fit.llf, abs=1e-8)


def test_predict_and_fitted_values(slopes_df, slopes_fit):
    r = slopes_fit
    X = np.column_stack([np.ones(len(slopes_df)), slopes_df.x])
    np.testing.assert_allclose(r.predict(), X @ r.fe_params.to_numpy())
    np.testing.assert_allclose(r.predict(slopes_df.iloc[:5]), X[:5] @ r.fe_params.to_numpy())
    np.testing.assert_allclose(r.predict(X[:5]), X[:5] @ r.fe_params.to_numpy())
    # fitted = fixed part + each group's random effects, written out by hand from random_effects.
    manual = []
    for _, row in slopes_df.iterrows():
        re = r.random_effects[row.g]
        manual.append(
            r.fe_params["Intercept"]
            + r.fe_params["x"] * row.x
            + re["g"]
            + re["x"] * row.x
            + re[f"sub[C(sub)[{int(row['sub'])}]]"]
        )
    np.testing.assert_allclose(r.fittedvalues, manual, rtol=1e-10)
    np.testing.assert_allclose(r.resid, slopes_df.y - np.asarray(manual), rtol=1e-8)


def test_random_effects_cov_matches_dense_formula(slopes_df, slopes_fit):
    r = slopes_fit
    g0 = slopes_df[slopes_df.g == 0]
    Z = np.column_stack([np.ones(len(g0)), g0.x] + [(g0["sub"] == s).astype(float) for s in range(3)])
    G = np.zeros((5, 5))
    G[:2, :2] = r.cov_re.to_numpy()
    G[2:, 2:] = np.eye(3) * r.vcomp[0]
    V = Z @ G @ Z.T + r.scale * np.eye(len(g0))
    expected = G - G @ Z.T @ np.linalg.solve(V, Z @ G)
    np.testing.assert_allclose(r.random_effects_cov[0].to_numpy(), expected, rtol=1e-8, atol=1e-12)
    # ... and the conditional mode of the same group.
    Xb = np.column_stack([np.ones(len(g0)), g0.x]) @ r.fe_params.to_numpy()
    np.testing.assert_allclose(r.random_effects[0].to_numpy(), G @ Z.T @ np.linalg.solve(V, g0.y - Xb), rtol=1e-7)


PROFILE_CASES = {
    "re": dict(formula="y ~ x", re_formula="1 + x", vc_formula=None),
    "vc": dict(formula="y ~ x", re_formula="1", vc_formula={"sub": "0 + C(sub)"}),
}


@pytest.fixture(scope="module")
def profile_data():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(30), 12)
    sub = np.tile(np.repeat(np.arange(3), 4), 30)
    x = rng.normal(size=g.size)
    y = (
        1
        + 0.5 * x
        + 2 * rng.normal(size=30)[g]
        + x * rng.normal(size=30)[g]
        + 1.5 * rng.normal(size=(30, 3))[g, sub]
        + 2 * rng.normal(size=g.size)
    )
    return pd.DataFrame({"y": y, "x": x, "g": g, "sub": sub})


@pytest.mark.parametrize("vtype, re_ix", [("re", 0), ("re", 1), ("vc", "sub")])
def test_profile_re_against_statsmodels(profile_data, vtype, re_ix):
    smf = pytest.importorskip("statsmodels.api")
    spec = PROFILE_CASES[vtype]
    ours_fit = sm.MixedLM.from_formula(
        spec["formula"], re_formula=spec["re_formula"], vc_formula=spec["vc_formula"], groups="g", data=profile_data
    ).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_fit = smf.MixedLM.from_formula(
            spec["formula"], re_formula=spec["re_formula"], vc_formula=spec["vc_formula"], groups="g", data=profile_data
        ).fit()
        # Only a fair comparison where statsmodels reaches the same optimum.
        assert ref_fit.llf == pytest.approx(ours_fit.llf, abs=1e-3)
        kw = dict(num_low=2, dist_low=0.2, num_high=2, dist_high=0.2)
        ref = ref_fit.profile_re(re_ix, vtype, **kw)
    ours = ours_fit.profile_re(re_ix, vtype, **kw)
    assert ours.shape == ref.shape == (5, 2)
    # The middle row is the maximum; the profile is lower on both sides.
    assert ours[2, 1] == pytest.approx(ours_fit.llf, abs=1e-6)
    assert np.all(ours[[0, 1, 3, 4], 1] < ours[2, 1])
    np.testing.assert_allclose(ours[:, 0], ref[:, 0], rtol=5e-3)
    np.testing.assert_allclose(ours[:, 1], ref[:, 1], atol=2e-3)
    assert np.all(ours[:, 1] >= ref[:, 1] - 1e-4)


def test_missing_drop_in_constructor_equals_fit_on_complete_rows(slopes_df):
    df = slopes_df.copy()
    df.loc[[3, 50, 77], "y"] = np.nan
    df.loc[[9], "x"] = np.inf
    X = np.column_stack([np.ones(len(df)), df.x])
    dropped = sm.MixedLM(df.y.to_numpy(), X, df.g.to_numpy(), exog_re=X, missing="drop").fit()
    ok = np.isfinite(df.y) & np.isfinite(df.x)
    complete = sm.MixedLM(df.y[ok].to_numpy(), X[ok], df.g[ok].to_numpy(), exog_re=X[ok]).fit()
    assert dropped.nobs == len(df) - 4
    assert dropped.llf == pytest.approx(complete.llf, rel=1e-12)
    np.testing.assert_allclose(dropped.params, complete.params, rtol=1e-9)


def test_sparse_exog_re_and_sparse_vc_matrices_are_accepted(slopes_df):
    X = np.column_stack([np.ones(len(slopes_df)), slopes_df.x])
    dense = sm.MixedLM(slopes_df.y, X, slopes_df.g, exog_re=X).fit()
    sparse = sm.MixedLM(slopes_df.y, X, slopes_df.g, exog_re=sp.csr_matrix(X)).fit()
    assert sparse.llf == pytest.approx(dense.llf, rel=1e-12)


def test_random_effects_labels_for_array_models(slopes_df):
    X = np.column_stack([np.ones(len(slopes_df)), slopes_df.x])
    r = sm.MixedLM(slopes_df.y.to_numpy(), X, slopes_df.g.to_numpy()).fit()
    assert r.model.exog_names == ["const", "x1"]
    assert r.model.param_names == ["const", "x1", "Group Var"]
    assert sorted(r.random_effects) == list(range(40))
    assert isinstance(r.params, np.ndarray)


def test_exog_vc_round_trips_in_statsmodels_layout(slopes_df, slopes_fit):
    model = slopes_fit.model
    vcs = model.exog_vc
    assert vcs.names == ["sub"]
    assert len(vcs.mats[0]) == model.n_groups == 40
    assert vcs.mats[0][0].shape == (12, 3)
    assert vcs.colnames[0][0] == ["C(sub)[0]", "C(sub)[1]", "C(sub)[2]"]
    again = sm.MixedLM(model.endog, model.exog, model.groups, exog_re=model.exog_re, exog_vc=vcs).fit()
    assert again.llf == pytest.approx(slopes_fit.llf, rel=1e-12)


def test_build_system_is_the_deviance_function(slopes_fit):
    system = slopes_fit.model.build_system()
    # (random slopes beside a variance component, 200 columns: held dense, the first term eliminated)
    assert system.factorization_mode == "dense"
    assert -0.5 * system.deviance(slopes_fit.fit_result.theta, True) == pytest.approx(slopes_fit.llf, rel=1e-13)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vc_formula": {"sub": 3}}, r"vc_formula\['sub'\] must be a formula string such as '0 \+ C\(sub\)'; got 3"),
        ({"vc_formula": {"sub": None}}, r"vc_formula\['sub'\] must be a formula string"),
        ({"vc_formula": {"sub": "  "}}, r"vc_formula\['sub'\] is empty"),
        ({"vc_formula": "0 + C(sub)"}, r"vc_formula must be a dict .*got str"),
        ({"vc_formula": [("sub", "0 + C(sub)")]}, r"vc_formula must be a dict .*got list"),
        ({"vc_formula": {"sub": "0 + C(sub)", 1: "0 + x"}}, r"vc_formula's names must be strings .*got 1 \(int\)"),
        ({"vc_formula": {("a", "b"): "0 + C(sub)"}}, r"vc_formula's names must be strings"),
        ({"re_formula": 1}, r"re_formula must be a string .*got 1 \(int\)"),
        ({"re_formula": ["1"]}, r"re_formula must be a string"),
    ],
)
def test_from_formula_takes_formula_strings_only(slopes_df, kwargs, message):
    """Found by tests/test_fuzz.py: vc_formula={'sub': 3} raised Python's tokenizer's TypeError ("initial_value
    must be str or None, not int"); a name 1 raised str.join's TypeError in the singular-fit warning, or sorted()'s
    beside a string name."""
    with pytest.raises(sm.FormulaError, match=message):
        sm.MixedLM.from_formula("y ~ x", slopes_df, groups="g", **kwargs)


@pytest.mark.parametrize("formula", [3, None, b"y ~ x", ["y ~ x"]])
def test_from_formula_needs_a_formula_string(slopes_df, formula):
    with pytest.raises(sm.FormulaError, match="formula must be a string like 'y ~ x'"):
        sm.MixedLM.from_formula(formula, slopes_df, groups="g")


@pytest.mark.parametrize(
    "formula, n", [("y ~ x", 2), ("y ~ C(z)", 8), ("y ~ x + I(x**2) + I(x**3)", 4), ("y ~ 0 + C(z)", 8)]
)
def test_as_many_fixed_effects_as_observations_is_refused(formula, n):
    """Found by tests/test_fuzz.py: a ZeroDivisionError in the engine (REML's n - p = 0, or ML's sigma of 0 in the
    standard errors) when the fixed effects reproduce y exactly; lmer refuses the same designs."""
    rng = np.random.default_rng(n)
    d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "z": rng.normal(size=n), "g": np.arange(n) % 2})
    for reml in (True, False):
        with pytest.raises(
            sm.InputError,
            match=rf"fixed effects have {n} linearly independent column\(s\) .*for "
            rf"{n} observation\(s\)",
        ):
            sm.MixedLM.from_formula(formula, d, groups="g").fit(reml=reml)
    with pytest.raises(sm.InputError, match="no residual variance"):
        sm.MixedLM(
            d.y.to_numpy(),
            np.column_stack([np.ones(n)] + [rng.normal(size=n)] * 0 + [rng.normal(size=n) for _ in range(n - 1)]),
            d.g.to_numpy(),
        )


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5])
def test_a_fit_that_reproduces_every_observation_is_refused(seed):
    """Found by tests/test_fuzz.py: three rows, a random intercept and slope on a covariate of size ~7e18 in two
    groups: the residual variance is exactly 0 and summary()'s standard errors raised ZeroDivisionError (1 / scale).
    lmer refuses the same model before fitting (number of observations <= number of random effects)."""
    rng = np.random.default_rng(seed)
    d = pd.DataFrame({"y": rng.normal(size=3), "x": rng.integers(2**62, 2**63 - 1, 3), "h": [100, 100, 107]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (0, or a few 1e-16 where the optimizer stopped on its way down the unbounded deviance)
        exactly = r"reproduces all 3 observations exactly \(residual variance (0|\S+, zero to rounding)\)"
        with pytest.raises(sm.InputError, match=exactly):
            sm.MixedLM.from_formula("y ~ x", d, groups="h", re_formula="1 + x").fit()
        with pytest.raises(sm.InputError, match=r"number of observations \(=3\) <= number of random effects"):
            sm.lmer("y ~ x + (x | h)", d)


@pytest.mark.parametrize("seed", range(6))
def test_a_model_that_reproduces_every_observation_is_an_input_error(seed):
    """Found by tests/test_fuzz.py: 3 rows, two groups, re_formula '1 + x' with x near 5e18: the deviance is not
    finite near the optimum and the polish handed a non-finite Hessian to scipy's cho_factor (a ValueError)."""
    rng = np.random.default_rng(seed)
    data = pd.DataFrame({"y": rng.normal(size=3), "x": rng.integers(2**62, 2**63 - 1, 3), "h": [100, 100, 107]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        with pytest.raises(sm.InputError, match="reproduces all 3 observations exactly"):
            sm.MixedLM.from_formula("y ~ x", data, groups="h", re_formula="1 + x").fit()
