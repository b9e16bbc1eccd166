"""sparsemix.MixedLM against statsmodels.api.MixedLM: the same model, the same synthetic data, both fitted.

Every case fits one model with both libraries (once per module, cached) and the generic tests compare the
results attribute by attribute. The tolerances follow from how the two fits differ:

* Our optimizer converges tighter than statsmodels' (BFGS with gtol 1e-5 on the profiled likelihood), so our
  log-likelihood must be at least as high, and the variance parameters agree only to ~1e-4 relative (1e-3 is
  asserted); the fixed effects, a GLS solve at those parameters, to ~1e-6.
* The standard errors of variance parameters differ on purpose (ours include the uncertainty of `scale`,
  statsmodels' are sqrt(scale) x SE(parameter / scale)); see the `bse_re` tests at the bottom.

The data are generated here with fixed seeds (a few hundred rows per case); the whole module runs in a few
seconds.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.regression.mixed_linear_model import MixedLMParams as SmMixedLMParams
from statsmodels.regression.mixed_linear_model import VCSpec as SmVCSpec

import sparsemix
from sparsemix import MixedLMParams, VCSpec

# -- data ----------------------------------------------------------------------------------------------


def make_grouped(seed, n_groups=40, per_group=12, sd_int=1.0, sd_slope=0.5, corr=0.4, sd_sub=0.7, sd_e=1.0):
    """Groups `g` of `per_group` rows; a covariate x with a correlated random intercept and slope, and a
    within-group factor `sub` (3 levels, every level in every group) with its own random effect."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    sub = np.tile(np.arange(per_group) % 3, n_groups)
    cov = np.array([[sd_int**2, corr * sd_int * sd_slope], [corr * sd_int * sd_slope, sd_slope**2]])
    b = rng.multivariate_normal([0.0, 0.0], cov, size=n_groups)
    s = rng.normal(scale=sd_sub, size=(n_groups, 3))
    y = 1.0 + 2.0 * x + b[g, 0] + b[g, 1] * x + s[g, sub] + rng.normal(scale=sd_e, size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g, "sub": sub})


def make_crossed(seed, n=600, n_a=20, n_b=15):
    """Two crossed factors a (20 levels) and b (15 levels), each with a random effect."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_a, n)
    b = rng.integers(0, n_b, n)
    x = rng.normal(size=n)
    y = 1.0 + 2.0 * x + rng.normal(scale=1.0, size=n_a)[a] + rng.normal(scale=0.6, size=n_b)[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def vc_spec(cls, groups, factor, n_levels, name="sub"):
    """A VCSpec (statsmodels' or ours) with the indicators of `factor` within each group (sorted labels)."""
    labels = sorted(set(groups.tolist()))
    mats = [[np.eye(n_levels)[factor[groups == lab]] for lab in labels]]
    colnames = [[[str(j) for j in range(n_levels)] for _ in labels]]
    return cls([name], colnames, mats)


NEW_X = np.linspace(-2.0, 2.0, 7)
NEW_FRAME = pd.DataFrame({"x": NEW_X}, index=np.arange(100, 107))  # a new index: predict must keep it
NEW_ARRAY = np.column_stack([np.ones(NEW_X.size), NEW_X])


# -- fitting both ------------------------------------------------------------------------------------------


@dataclass
class Pair:
    sm: object  # statsmodels MixedLMResults (wrapper)
    ours: sparsemix.MixedLMResults
    reml: bool
    new_exog: object  # for predict(): a DataFrame (formula models) or an ndarray
    our_warnings: list = field(default_factory=list)


def _fit_sm(make_model, **fit_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' ConvergenceWarning / FutureWarning chatter
        return make_model().fit(**fit_kwargs)


def _fit_ours(make_model, **fit_kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = make_model().fit(**fit_kwargs)
    return res, [f"{w.category.__name__}: {w.message}" for w in caught]


def _pair(sm_model, our_model, new_exog, reml=True, sm_fit=None, our_fit=None):
    sm_res = _fit_sm(sm_model, reml=reml, **(sm_fit or {}))
    ours, caught = _fit_ours(our_model, reml=reml, **(our_fit or {}))
    return Pair(sm_res, ours, reml, new_exog, caught)


def _formula_pair(df, reml, formula="y ~ x", **kwargs):
    return _pair(
        lambda: sm.MixedLM.from_formula(formula, df, **kwargs),
        lambda: sparsemix.MixedLM.from_formula(formula, df, **kwargs),
        NEW_FRAME,
        reml,
    )


def case_random_intercept(reml):
    return _formula_pair(make_grouped(11), reml, groups="g")


def case_random_slopes(reml):
    return _formula_pair(make_grouped(1), reml, groups="g", re_formula="1 + x")


def case_vc_within_groups(reml):
    return _formula_pair(make_grouped(1), reml, groups="g", re_formula="1", vc_formula={"sub": "0 + C(sub)"})


def case_crossed(reml):
    df = make_crossed(2)
    return _formula_pair(df, reml, groups=np.ones(len(df)), vc_formula={"a": "0 + C(a)", "b": "0 + C(b)"})


def case_array_vcspec(reml):
    """Array constructor: const + x, a random intercept and slope (exog_re), and a VCSpec."""
    df = make_grouped(3)
    y, g, sub = df.y.to_numpy(), df.g.to_numpy(), df["sub"].to_numpy()
    X = sm.add_constant(df.x.to_numpy())
    Z = np.column_stack([np.ones(len(df)), df.x.to_numpy()])
    return _pair(
        lambda: sm.MixedLM(y, X, g, exog_re=Z, exog_vc=vc_spec(SmVCSpec, g, sub, 3)),
        lambda: sparsemix.MixedLM(y, X, g, exog_re=Z, exog_vc=vc_spec(VCSpec, g, sub, 3)),
        NEW_ARRAY,
        reml,
    )


def case_array_dict_vc(reml):
    """statsmodels' dict-of-dicts exog_vc (names given unsorted: 'zsub' before 'half'); no exog_re, so no
    random intercept."""
    df = make_grouped(5)
    y, g, sub = df.y.to_numpy(), df.g.to_numpy(), df["sub"].to_numpy()
    X = sm.add_constant(df.x.to_numpy())
    rows = {lab: np.flatnonzero(g == lab) for lab in sorted(set(g.tolist()))}
    exog_vc = {
        "zsub": {lab: np.eye(3)[sub[r]] for lab, r in rows.items()},
        "half": {lab: np.eye(2)[r % 2] for lab, r in rows.items()},
    }
    with pytest.warns(FutureWarning, match="deprecated variance components format"):  # as statsmodels warns
        ours = sparsemix.MixedLM(y, X, g, exog_vc=exog_vc)
    return _pair(lambda: sm.MixedLM(y, X, g, exog_vc=exog_vc), lambda: ours, NEW_ARRAY, reml)


def frame_with_missing():
    """make_grouped(5) with NaN in y (2 rows), x (3 rows) and the group column (2 rows), and an unused
    all-NaN column z, which must not cause any row to be dropped: 480 - 7 = 473 rows remain."""
    df = make_grouped(5)
    df["z"] = np.nan
    df.loc[[3, 50], "y"] = np.nan
    df.loc[[7, 100, 101], "x"] = np.nan
    df["g"] = df["g"].astype(float)
    df.loc[[200, 333], "g"] = np.nan
    return df


def case_formula_drop(reml):
    return _formula_pair(frame_with_missing(), reml, groups="g", missing="drop")


def arrays_with_missing():
    """Arrays with NaN in endog, in x (which appears in both exog and exog_re) and in groups."""
    df = make_grouped(6)
    n = len(df)
    y = df.y.to_numpy().copy()
    x = df.x.to_numpy().copy()
    g = df.g.to_numpy().astype(float)
    y[[3, 50]] = np.nan
    x[[7, 100]] = np.nan
    g[[200, 333]] = np.nan
    X = np.column_stack([np.ones(n), x])
    Z = np.column_stack([np.ones(n), x])
    keep = np.isfinite(y) & np.isfinite(x) & np.isfinite(g)
    return y, X, g, Z, keep


def case_array_drop(reml):
    """missing='drop' through the array constructor. statsmodels' constructor cannot do this (its groups are
    not filtered), so statsmodels is fitted on the already-dropped data."""
    y, X, g, Z, keep = arrays_with_missing()
    return _pair(
        lambda: sm.MixedLM(y[keep], X[keep], g[keep], exog_re=Z[keep]),
        lambda: sparsemix.MixedLM(y, X, g, exog_re=Z, missing="drop"),
        NEW_ARRAY,
        reml,
    )


def arrays_with_missing_group():
    """A VCSpec built for all 40 groups, while every row of group 7 (and one other row) has a NaN endog:
    after dropping, group 7 and its VC columns must vanish."""
    df = make_grouped(6)
    y = df.y.to_numpy().copy()
    g, sub = df.g.to_numpy(), df["sub"].to_numpy()
    y[g == 7] = np.nan
    y[5] = np.nan
    X = np.column_stack([np.ones(len(df)), df.x.to_numpy()])
    return y, X, g, sub, np.isfinite(y)


def case_array_drop_vc(reml):
    y, X, g, sub, keep = arrays_with_missing_group()
    return _pair(
        lambda: sm.MixedLM(y[keep], X[keep], g[keep], exog_vc=vc_spec(SmVCSpec, g[keep], sub[keep], 3)),
        lambda: sparsemix.MixedLM(y, X, g, exog_vc=vc_spec(VCSpec, g, sub, 3), missing="drop"),
        NEW_ARRAY,
        reml,
    )


def case_free(reml):
    """Independent random effects: `free` holds the Cholesky factor's off-diagonal at its start value 0."""
    df = make_grouped(5)
    return _pair(
        lambda: sm.MixedLM.from_formula("y ~ x", df, groups="g", re_formula="1 + x"),
        lambda: sparsemix.MixedLM.from_formula("y ~ x", df, groups="g", re_formula="1 + x"),
        NEW_FRAME,
        reml,
        sm_fit={"free": SmMixedLMParams.from_components(np.ones(2), np.eye(2))},
        our_fit={"free": MixedLMParams.from_components(np.ones(2), np.eye(2))},
    )


CASES = {
    "intercept-reml": (case_random_intercept, True),
    "intercept-ml": (case_random_intercept, False),
    "slopes-reml": (case_random_slopes, True),
    "slopes-ml": (case_random_slopes, False),
    "vc-reml": (case_vc_within_groups, True),
    "vc-ml": (case_vc_within_groups, False),
    "crossed-reml": (case_crossed, True),
    "crossed-ml": (case_crossed, False),
    "array-vcspec-reml": (case_array_vcspec, True),
    "array-vcspec-ml": (case_array_vcspec, False),
    "array-dictvc-reml": (case_array_dict_vc, True),
    "array-dictvc-ml": (case_array_dict_vc, False),
    "formula-drop-reml": (case_formula_drop, True),
    "formula-drop-ml": (case_formula_drop, False),
    "array-drop-reml": (case_array_drop, True),
    "array-drop-vc-ml": (case_array_drop_vc, False),
    "free-reml": (case_free, True),
    "free-ml": (case_free, False),
}


@functools.cache
def fitted(case_id) -> Pair:
    builder, reml = CASES[case_id]
    return builder(reml)


@pytest.fixture(params=list(CASES), scope="module")
def pair(request) -> Pair:
    return fitted(request.param)


# -- small helpers ---------------------------------------------------------------------------------------------


def arr(x):
    return np.asarray(x, dtype=float)


def sm_names(res):
    """statsmodels keeps the names on model.data."""
    d = res.model.data
    return {
        "param_names": list(d.param_names),
        "exog_names": list(res.model.exog_names),
        "exog_re_names": list(d.exog_re_names),
    }


def our_names(res):
    m = res.model
    return {
        "param_names": list(m.param_names),
        "exog_names": list(m.exog_names),
        "exog_re_names": list(m.exog_re_names),
    }


# -- the generic comparisons, for every case -------------------------------------------------------------------


def test_our_fit_converged_without_warnings(pair):
    assert pair.ours.converged
    assert pair.our_warnings == []
    assert pair.sm.converged  # otherwise the comparison below is against a non-answer


def test_llf_at_least_as_good_and_same_model(pair):
    ours, theirs = pair.ours.llf, pair.sm.llf
    assert ours >= theirs - 1e-6 * abs(theirs)
    # Same likelihood (constants included): the two optima differ only by optimizer precision.
    assert ours - theirs < 1e-5 * abs(theirs)


def test_nobs_and_groups(pair):
    assert pair.ours.nobs == pair.sm.nobs
    assert pair.ours.model.n_groups == pair.sm.model.n_groups
    assert list(pair.ours.model.group_labels) == list(pair.sm.model.group_labels)
    assert pair.ours.method == pair.sm.method == ("REML" if pair.reml else "ML")
    assert (pair.ours.k_fe, pair.ours.k_re, pair.ours.k_re2, pair.ours.k_vc) == (
        pair.sm.k_fe,
        pair.sm.k_re,
        pair.sm.k_re2,
        pair.sm.k_vc,
    )


def test_names(pair):
    assert our_names(pair.ours) == sm_names(pair.sm)
    assert pair.ours.model.endog_names == pair.sm.model.endog_names


def test_fe_params(pair):
    ours, theirs = pair.ours.fe_params, pair.sm.fe_params
    assert type(ours) is type(theirs)
    if isinstance(theirs, pd.Series):
        assert list(ours.index) == list(theirs.index)
    t = arr(theirs)
    np.testing.assert_allclose(arr(ours), t, rtol=1e-4, atol=1e-4 * np.abs(t).max())


def test_bse_fe(pair):
    # Not 1e-3: statsmodels takes the fe block of the inverse of the *joint* observed Hessian (fe x variance
    # parameters, whose cross terms are not exactly zero at the estimates); ours is the GLS formula
    # scale * (X'V^-1 X)^-1 (checked exactly in test_bse_fe_is_the_gls_formula). That is a difference of
    # definition, not of optimizer precision: in the array-vcspec cases statsmodels' own bse_fe of x1 is
    # 1.1e-3 (REML) / 1.2e-3 (ML) relative away from the GLS formula evaluated at statsmodels' own estimates,
    # while ours is 4e-6 away from it (and our llf is higher). The other cases agree to < 5e-4.
    ours, theirs = pair.ours.bse_fe, pair.sm.bse_fe
    assert type(ours) is type(theirs)
    if isinstance(theirs, pd.Series):
        assert list(ours.index) == list(theirs.index)
    np.testing.assert_allclose(arr(ours), arr(theirs), rtol=2e-3)


def test_scale(pair):
    np.testing.assert_allclose(pair.ours.scale, pair.sm.scale, rtol=1e-3)


def test_cov_re(pair):
    ours, theirs = pair.ours.cov_re, pair.sm.cov_re
    assert type(ours) is type(theirs)
    if isinstance(theirs, pd.DataFrame):
        assert list(ours.index) == list(theirs.index)
        assert list(ours.columns) == list(theirs.columns)
    t = arr(theirs)
    assert arr(ours).shape == t.shape
    if t.size:
        # Relative to the variances: a covariance of (near) zero has no meaningful relative error.
        np.testing.assert_allclose(arr(ours), t, rtol=1e-3, atol=1e-3 * np.abs(np.diag(t)).max())
        np.testing.assert_allclose(
            arr(pair.ours.cov_re_unscaled),
            arr(pair.sm.cov_re_unscaled),
            rtol=1e-3,
            atol=1e-3 * np.abs(np.diag(t)).max() / pair.sm.scale,
        )


def test_vcomp(pair):
    ours, theirs = pair.ours.vcomp, pair.sm.vcomp
    assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)


def test_params_vector(pair):
    ours, theirs = pair.ours.params, pair.sm.params
    assert type(ours) is type(theirs)
    if isinstance(theirs, pd.Series):
        assert list(ours.index) == list(theirs.index)
    k = pair.sm.k_fe
    o, t = arr(ours), arr(theirs)
    assert o.shape == t.shape
    np.testing.assert_allclose(o[:k], t[:k], rtol=1e-4, atol=1e-4 * np.abs(t[:k]).max())
    if t.size > k:  # unscaled variance parameters
        np.testing.assert_allclose(o[k:], t[k:], rtol=1e-3, atol=1e-3 * np.abs(t[k:]).max())


def test_random_effects(pair):
    ours, theirs = pair.ours.random_effects, pair.sm.random_effects
    assert list(ours) == list(theirs)
    scale_of_effects = max(np.abs(arr(s)).max() for s in theirs.values())
    for label in theirs:
        assert isinstance(ours[label], pd.Series)
        assert list(ours[label].index) == list(theirs[label].index), label
        np.testing.assert_allclose(
            arr(ours[label]), arr(theirs[label]), rtol=1e-3, atol=1e-3 * scale_of_effects, err_msg=str(label)
        )


def test_fittedvalues_and_resid(pair):
    for attr in ("fittedvalues", "resid"):
        ours, theirs = getattr(pair.ours, attr), getattr(pair.sm, attr)
        assert type(ours) is type(theirs), attr
        if isinstance(theirs, pd.Series):
            assert ours.index.equals(theirs.index), attr
        t = arr(theirs)
        assert arr(ours).shape == t.shape
        np.testing.assert_allclose(arr(ours), t, rtol=1e-4, atol=1e-4 * np.abs(t).max(), err_msg=attr)


def test_predict(pair):
    ours, theirs = pair.ours.predict(pair.new_exog), pair.sm.predict(pair.new_exog)
    assert type(ours) is type(theirs)
    if isinstance(theirs, pd.Series):
        assert ours.index.equals(theirs.index)
    t = arr(theirs)
    np.testing.assert_allclose(arr(ours), t, rtol=1e-4, atol=1e-4 * np.abs(t).max())
    # predict() without data: the fixed part on the model's rows
    np.testing.assert_allclose(arr(pair.ours.predict()), arr(pair.sm.predict()), rtol=1e-4, atol=1e-4 * np.abs(t).max())


def test_aic_bic(pair):
    ours, theirs = pair.ours, pair.sm
    if pair.reml:
        assert np.isnan(ours.aic) and np.isnan(ours.bic)
        assert np.isnan(theirs.aic) and np.isnan(theirs.bic)
        return
    # Same parameter count: aic + 2 llf = 2 df and bic + 2 llf = log(n) df, with the same df.
    df_ours = (ours.aic + 2 * ours.llf) / 2
    df_theirs = (theirs.aic + 2 * theirs.llf) / 2
    assert df_ours == pytest.approx(df_theirs, abs=1e-8)
    assert df_ours == pytest.approx(round(df_ours), abs=1e-8)
    assert (ours.bic + 2 * ours.llf) / np.log(ours.nobs) == pytest.approx(df_theirs, abs=1e-8)
    np.testing.assert_allclose([ours.aic, ours.bic], [theirs.aic, theirs.bic], rtol=1e-8)


# -- the summary -----------------------------------------------------------------------------------------


NUMBER = re.compile(r"(?<![\w.\[])-?\d+\.\d+(?![\w.\]])")


def summary_parts(res):
    """(lines, param rows {label: line}) of the summary text; the rows are found by the model's names."""
    text = str(res.summary())
    lines = text.split("\n")
    assert text.endswith("\n")
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(rules) == 2
    end = max(i for i, line in enumerate(lines) if line and set(line) == {"="})
    names = (
        sm_names(res)["param_names"] if not isinstance(res, sparsemix.MixedLMResults) else our_names(res)["param_names"]
    )
    body = lines[rules[1] + 1 : end]
    assert len(body) == len(names)
    rows = {}
    for name, line in zip(names, body):
        assert line.startswith(name + " "), (name, line)
        rows[name] = line
    return lines, rows


def mask_variance_stderr(line, label):
    """Blank the Std.Err. cell of a variance-parameter row (the numbers that are meant to differ)."""
    numbers = list(NUMBER.finditer(line, len(label)))
    assert len(numbers) == 2, line  # Coef. and Std.Err. only; z, P and the CI are empty
    a, b = numbers[1].span()
    return line[:a] + " " * (b - a) + line[b:]


def test_summary_layout(pair):
    ours_lines, ours_rows = summary_parts(pair.ours)
    sm_lines, sm_rows = summary_parts(pair.sm)
    assert list(ours_rows) == list(sm_rows)
    assert [len(line) for line in ours_lines] == [len(line) for line in sm_lines]
    var_labels = list(sm_rows)[pair.sm.k_fe :]

    def masked(lines):
        out = []
        for line in lines:
            label = next((lab for lab in var_labels if line.startswith(lab + " ")), None)
            if label is not None:
                line = mask_variance_stderr(line, label)
            out.append(re.sub(r"\d", "9", line))
        return out

    assert masked(ours_lines) == masked(sm_lines)


def test_summary_coef_column(pair):
    _, ours_rows = summary_parts(pair.ours)
    _, sm_rows = summary_parts(pair.sm)
    for label, line in sm_rows.items():
        ours_coef = NUMBER.search(ours_rows[label], len(label)).group()
        sm_coef = NUMBER.search(line, len(label)).group()
        # Equal after rounding to 3 decimals; statsmodels' variance estimates are only good to ~1e-4
        # relative, which can move a value across a rounding boundary (e.g. 0.3405 -> 0.341 vs 0.340),
        # so one unit in the last place is allowed.
        assert abs(float(ours_coef) - float(sm_coef)) <= 0.0010001, (label, ours_coef, sm_coef)


# -- case-specific checks ---------------------------------------------------------------------------------


def test_formula_drop_rows_and_index():
    p = fitted("formula-drop-reml")
    assert p.ours.nobs == p.sm.nobs == 473
    assert p.ours.fittedvalues.index.equals(p.sm.fittedvalues.index)
    assert not p.ours.fittedvalues.index.isin([3, 50, 7, 100, 101, 200, 333]).any()


def test_array_drop_equals_fit_on_dropped_data():
    """Ours with NaNs and missing='drop' is the same fit as ours on the rows without NaNs."""
    y, X, g, Z, keep = arrays_with_missing()
    dropped = sparsemix.MixedLM(y, X, g, exog_re=Z, missing="drop").fit()
    clean = sparsemix.MixedLM(y[keep], X[keep], g[keep], exog_re=Z[keep]).fit()
    assert dropped.nobs == clean.nobs == int(keep.sum()) == 474
    assert dropped.llf == pytest.approx(clean.llf, rel=1e-12)
    np.testing.assert_allclose(dropped.params, clean.params, rtol=1e-8)
    np.testing.assert_allclose(dropped.fittedvalues, clean.fittedvalues, rtol=1e-8)
    assert list(dropped.random_effects) == list(clean.random_effects)


def test_array_drop_removes_an_emptied_group():
    p = fitted("array-drop-vc-ml")
    assert p.ours.nobs == p.sm.nobs == 467
    assert p.ours.model.n_groups == 39
    assert 7 not in p.ours.random_effects


def test_free_keeps_the_covariance_at_zero():
    for case in ("free-reml", "free-ml"):
        p = fitted(case)
        assert arr(p.sm.cov_re)[0, 1] == 0.0
        assert arr(p.ours.cov_re)[0, 1] == 0.0
        # The fixed parameter has standard error 0 in both; the free ones do not.
        assert p.sm.bse["g x x Cov"] == 0.0
        assert p.ours.bse["g x x Cov"] == 0.0
        assert p.ours.bse_re["g x x Cov"] == 0.0
        assert (arr(p.ours.bse_re)[[0, 2]] > 0).all()
        # and the constrained fit is worse than the unconstrained one (the data have correlation 0.4)
        unconstrained = sparsemix.MixedLM.from_formula("y ~ x", make_grouped(5), groups="g", re_formula="1 + x").fit(
            reml=p.reml
        )
        assert unconstrained.llf > p.ours.llf


def test_vc_names_order():
    """A VCSpec keeps its order; the dict form is sorted by name (statsmodels' _convert_vc)."""
    p = fitted("array-dictvc-reml")
    assert p.ours.model.param_names[-2:] == ["half Var", "zsub Var"]
    assert list(p.ours.random_effects[0].index) == ["half[0]", "half[1]", "zsub[0]", "zsub[1]", "zsub[2]"]


# -- standard errors of the variance parameters: the documented difference ------------------------------


@functools.cache
def noisy_pair(re_formula, reml):
    """Residual sd 4 (scale ~ 16), so that the factor sqrt(scale) ~ 4 between the two conventions is clear."""
    df = make_grouped(9, n_groups=60, sd_int=3.0, sd_slope=1.5, sd_e=4.0)
    kwargs = {"groups": "g"} if re_formula is None else {"groups": "g", "re_formula": re_formula}
    p = _pair(
        lambda: sm.MixedLM.from_formula("y ~ x", df, **kwargs),
        lambda: sparsemix.MixedLM.from_formula("y ~ x", df, **kwargs),
        NEW_FRAME,
        reml,
    )
    return p, df


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("re_formula", [None, "1 + x"], ids=["intercept", "slopes"])
def test_bse_re_is_statsmodels_times_sqrt_scale(re_formula, reml):
    p, _ = noisy_pair(re_formula, reml)
    assert p.ours.llf >= p.sm.llf - 1e-6 * abs(p.sm.llf)
    np.testing.assert_allclose(
        arr(p.ours.cov_re), arr(p.sm.cov_re), rtol=1e-3, atol=1e-3 * np.abs(np.diag(arr(p.sm.cov_re))).max()
    )
    root_scale = np.sqrt(p.ours.scale)
    assert 3.5 < root_scale < 4.5
    ours, theirs = p.ours.bse_re, p.sm.bse_re
    assert list(ours.index) == list(theirs.index)
    factor = arr(ours) / arr(theirs) / root_scale
    assert ((factor > 0.7) & (factor < 1.5)).all(), factor
    # i.e. statsmodels' number is smaller by about sqrt(scale) ~ 4
    assert (arr(theirs) < arr(ours) / 2.5).all()
    # The summary's Std.Err. column of the variance rows shows these numbers in both libraries.
    _, ours_rows = summary_parts(p.ours)
    _, sm_rows = summary_parts(p.sm)
    for j, label in enumerate(list(sm_rows)[p.sm.k_fe :]):
        assert float(NUMBER.findall(ours_rows[label][len(label) :])[1]) == pytest.approx(arr(ours)[j], abs=6e-4)
        assert float(NUMBER.findall(sm_rows[label][len(label) :])[1]) == pytest.approx(arr(theirs)[j], abs=6e-4)


def dense_loglike(y, X, groups, sigma_b2, sigma2, reml):
    """Log-likelihood of y = X beta + b_group + e (random intercept), beta at its GLS value, written with
    dense V_i = sigma_b2 J + sigma2 I per group; REML adds -1/2 logdet(X'V^-1X) + p/2 log(2 pi)."""
    ldet, XVX, XVy, parts = 0.0, np.zeros((X.shape[1],) * 2), np.zeros(X.shape[1]), []
    for lab in np.unique(groups):
        r = groups == lab
        V = sigma_b2 * np.ones((r.sum(), r.sum())) + sigma2 * np.eye(r.sum())
        Vi = np.linalg.inv(V)
        ldet += np.linalg.slogdet(V)[1]
        XVX += X[r].T @ Vi @ X[r]
        XVy += X[r].T @ Vi @ y[r]
        parts.append((r, Vi))
    beta = np.linalg.solve(XVX, XVy)
    q = sum((y[r] - X[r] @ beta) @ Vi @ (y[r] - X[r] @ beta) for r, Vi in parts)
    out = -0.5 * (ldet + q + len(y) * np.log(2 * np.pi))
    if reml:
        out += -0.5 * np.linalg.slogdet(XVX)[1] + 0.5 * X.shape[1] * np.log(2 * np.pi)
    return out, XVX


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_bse_re_is_the_observed_information_on_the_variance_scale(reml):
    """Ours is the inverse observed information of the (REML) log-likelihood in (sigma_b^2, sigma^2): a
    dense numerical Hessian, independent of both libraries, gives the same standard errors."""
    p, df = noisy_pair(None, reml)
    y, g = df.y.to_numpy(), df.g.to_numpy()
    X = np.column_stack([np.ones(len(df)), df.x.to_numpy()])
    theta = np.array([arr(p.ours.cov_re)[0, 0], p.ours.scale])
    f = lambda t: dense_loglike(y, X, g, t[0], t[1], reml)[0]  # noqa: E731
    assert f(theta) == pytest.approx(p.ours.llf, rel=1e-10)
    h = 1e-3 * theta
    H = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h[i], np.eye(2)[j] * h[j]
            H[i, j] = (f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)) / (
                4 * h[i] * h[j]
            )
    se = np.sqrt(np.diag(np.linalg.inv(-H)))
    assert arr(p.ours.bse_re)[0] == pytest.approx(se[0], rel=1e-4)
    assert p.ours.scale_se == pytest.approx(se[1], rel=1e-4)
    # statsmodels' bse_re is about se / sqrt(scale)
    assert arr(p.sm.bse_re)[0] * np.sqrt(p.sm.scale) / se[0] == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_bse_fe_is_the_gls_formula(reml):
    p, df = noisy_pair(None, reml)
    y, g = df.y.to_numpy(), df.g.to_numpy()
    X = np.column_stack([np.ones(len(df)), df.x.to_numpy()])
    _, XVX = dense_loglike(y, X, g, arr(p.ours.cov_re)[0, 0], p.ours.scale, reml)
    np.testing.assert_allclose(arr(p.ours.bse_fe), np.sqrt(np.diag(np.linalg.inv(XVX))), rtol=1e-8)


# -- regression tests for bugs this file found ------------------------------------------------


def test_default_random_intercept_name_in_array_constructor():
    df = make_grouped(9)
    y, g = df.y.to_numpy(), df.g.to_numpy()
    X = np.column_stack([np.ones(len(df)), df.x.to_numpy()])
    theirs = _fit_sm(lambda: sm.MixedLM(y, X, g))
    ours = sparsemix.MixedLM(y, X, g).fit()
    assert list(ours.model.param_names) == list(theirs.model.data.param_names)  # passes: 'Group Var'
    assert list(ours.random_effects[0].index) == list(theirs.random_effects[0].index) == ["Group Var"]
    assert list(ours.model.exog_re_names) == list(theirs.model.data.exog_re_names)


@pytest.mark.parametrize("method", [None, "lbfgs"], ids=["default", "lbfgs"])
def test_vc_spanning_the_fixed_effects_fits(method):
    """Regression: the variance components span X (per-group intercept via C(sub), per-group slope via x).
    At dc5e06d the fit aborted with RankDeficientError when L-BFGS-B tried a huge theta, at which
    X'V^-1X = X'X - R_ZX'R_ZX loses positive definiteness to cancellation; such a trial point must count as
    infeasible (infinite deviance), not end the fit."""
    df = make_grouped(3)
    kwargs = {"groups": "g", "vc_formula": {"sub": "0 + C(sub)", "xs": "0 + x"}}
    theirs = _fit_sm(lambda: sm.MixedLM.from_formula("y ~ x", df, **kwargs))
    ours = sparsemix.MixedLM.from_formula("y ~ x", df, **kwargs).fit(method=method)
    assert ours.converged
    assert ours.llf >= theirs.llf - 1e-6 * abs(theirs.llf)
    np.testing.assert_allclose(ours.vcomp, theirs.vcomp, rtol=1e-3)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_loglike_at_a_huge_theta_is_infeasible_not_an_error(reml):
    """The same model: at theta = sqrt(vcomp / scale) = 1e8, X'V^-1X is numerically singular. The
    log-likelihood there is -inf (or finite), so an optimizer stepping there is pushed back; at dc5e06d it
    raised RankDeficientError and ended the fit."""
    model = sparsemix.MixedLM.from_formula(
        "y ~ x", make_grouped(3), groups="g", vc_formula={"sub": "0 + C(sub)", "xs": "0 + x"}
    )
    value = model.loglike(np.array([1e8, 1e8]), reml=reml)  # packed sqrt(vcomp), as use_sqrt=True
    assert value == -np.inf or np.isfinite(value)
    assert model.loglike(np.array([1e8, 1e8]), reml=reml) < model.loglike(np.array([1.0, 0.5]), reml=reml)


def test_categorical_vc_levels_absent_from_a_group():
    df = make_grouped(5)
    rng = np.random.default_rng(0)
    lev = rng.integers(0, 4, len(df))
    lev[df.g.to_numpy() < 5] %= 2  # groups 0-4 only have levels 0 and 1
    df["lev"] = pd.Categorical(lev)
    kwargs = {"groups": "g", "re_formula": "1", "vc_formula": {"lev": "0 + C(lev)"}}
    theirs = _fit_sm(lambda: sm.MixedLM.from_formula("y ~ x", df, **kwargs))
    ours = sparsemix.MixedLM.from_formula("y ~ x", df, **kwargs).fit()
    assert list(ours.random_effects[0].index) == list(theirs.random_effects[0].index)
