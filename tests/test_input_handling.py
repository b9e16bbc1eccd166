"""Inputs real data brings, through lmer (the CLI shares this path): each gives a correct fit or a sparsemix
error that names the problem and the fix."""

import resource
import warnings

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix import FormulaError, InputError, MissingDataError, RankDeficiencyWarning, SingularFitWarning


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(31)
    n = 300
    g, h, x = rng.integers(0, 10, n), rng.integers(0, 6, n), rng.normal(size=n)
    y = 2 + 0.7 * x + rng.normal(size=10)[g] + 0.5 * rng.normal(size=6)[h] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h})


F = "y ~ x + (1 | g) + (1 | h)"


def _quiet_fit(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsemix.lmer(formula, data, **kw)


def test_missing_values_drop_rows_and_say_how_many(frame):
    d = frame.copy()
    d.loc[[3, 50], "x"] = np.nan
    d.loc[7, "g"] = np.nan
    fit = sparsemix.lmer(F, d)
    assert fit.design.n_dropped == 3 and fit.nobs == 297
    assert "(3 observation(s) deleted due to missingness)" in str(fit.summary())
    assert fit.llf == pytest.approx(sparsemix.lmer(F, d.dropna()).llf, rel=1e-12)


def test_most_rows_dropped_is_said_with_the_columns_that_lose_them(frame):
    """lme4's na.omit is silent; where more than half the rows go (a file whose level "None" pandas read as missing)
    the fit says how many, in which columns, and why that may be the reading, not the data."""
    d = frame.copy()
    d.loc[d.index[:200], "x"] = np.nan
    d.loc[d.index[150:160], "g"] = np.nan  # (rows already short of x: counted for g too)
    with pytest.warns(sparsemix.DroppedRowsWarning) as caught:
        fit = sparsemix.lmer(F, d)
    message = str(caught[0].message)
    assert message.startswith("200 of 300 rows (67%) have a missing value") and "missing: x 200, g 10)" in message
    assert "keep_default_na=False" in message and fit.nobs == 100
    text = frame.assign(f=np.where(np.arange(len(frame)) % 4 == 0, "a", None))
    with pytest.warns(sparsemix.DroppedRowsWarning, match=r"225 of 300 rows \(75%\).*missing: f 225\)"):
        sparsemix.glmer("I(y > 0) ~ f + x + (1 | g)", text, family="binomial")
    d.loc[d.index[:200], "x"] = frame.x.iloc[:200]  # 10 of 300: lme4's silence
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsemix.DroppedRowsWarning)
        assert sparsemix.lmer(F, d).design.n_dropped == 10


@pytest.mark.parametrize("column", ["x", "y"])
def test_infinite_values_are_an_error_naming_the_column(frame, column):
    d = frame.copy()
    d.loc[4, column] = np.inf
    with pytest.raises(MissingDataError, match="infinite values in 1 row"):
        sparsemix.lmer(F, d)


def test_misspelled_columns_suggest_the_closest_name(frame):
    with pytest.raises(FormulaError, match="'xx'.*Did you mean 'x'"):
        sparsemix.lmer("y ~ xx + (1 | g)", frame)
    with pytest.raises(InputError, match="'gg'.*Did you mean 'g'"):
        sparsemix.lmer("y ~ x + (1 | gg)", frame)
    with pytest.raises(InputError, match="'w'"):
        sparsemix.lmer(F, frame, weights="w")


def test_non_numeric_response(frame):
    d = frame.assign(y=np.where(frame.y > 0, "high", "low"))
    with pytest.raises(InputError, match="response 'y' must be numeric.*'(high|low)'"):
        sparsemix.lmer(F, d)


def test_constant_response(frame):
    with pytest.raises(InputError, match="response 'y' is constant"):
        sparsemix.lmer(F, frame.assign(y=4.0))


def test_grouping_factor_with_one_level(frame):
    with pytest.raises(InputError, match="'g' has only 1 level"):
        sparsemix.lmer(F, frame.assign(g=1))


def test_as_many_levels_as_observations(frame):
    with pytest.raises(InputError, match="'g' has 300 levels for 300 observations"):
        sparsemix.lmer(F, frame.assign(g=np.arange(len(frame))))


def test_rank_deficient_fixed_effects_drop_the_aliased_column(frame):
    d = frame.assign(x2=2 * frame.x - 1)
    with pytest.warns(RankDeficiencyWarning, match="dropping 1 column.*x2"):
        fit = sparsemix.lmer("y ~ x + x2 + (1 | g) + (1 | h)", d)
    assert fit.design.dropped_columns == ("x2",)
    reference = sparsemix.lmer(F, frame)
    assert fit.llf == pytest.approx(reference.llf, rel=1e-10)
    np.testing.assert_allclose(fit.fe_params, reference.fe_params, rtol=1e-7)


@pytest.mark.parametrize("offset, dropped", [(0.0, True), (1e-9, True), (1e-6, False), (1e-3, False)])
def test_a_column_is_aliased_by_its_residual_however_it_is_decided(offset, dropped):
    """lme4's rule (a residual on the earlier columns below 1e-7 of the column's norm) decides the same whether the
    Gram matrix's Cholesky factor settles it (every residual far above the rule) or X's QR and Gram-Schmidt do."""
    from sparsemix.formula.design_rules import drop_aliased

    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(500), rng.normal(size=(500, 3))])
    last = X[:, 1] + 0.5 * X[:, 2]
    direction = rng.normal(size=500)
    direction -= X[:, :3] @ np.linalg.lstsq(X[:, :3], direction, rcond=None)[0]  # off the earlier columns
    last = last + offset * np.linalg.norm(last) * direction / np.linalg.norm(direction)
    X = np.column_stack([X, last])
    names = ["(Intercept)", "a", "b", "c", "d"]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        kept, names_dropped = drop_aliased(X, names)
    assert kept == ([0, 1, 2, 3] if dropped else [0, 1, 2, 3, 4])
    assert names_dropped == (["d"] if dropped else [])


def test_perfectly_collinear_random_slopes_give_a_singular_fit(frame):
    d = frame.assign(x2=3 * frame.x)
    with pytest.warns(SingularFitWarning):
        fit = sparsemix.lmer("y ~ x + (1 + x + x2 | g)", d, reml=False)
    reference = _quiet_fit("y ~ x + (1 + x | g)", frame, reml=False)
    # The extra slope spans nothing new: the optimum is (at least) the smaller model's.
    assert np.isfinite(fit.llf) and fit.llf >= reference.llf - 1e-6
    assert fit.llf == pytest.approx(reference.llf, abs=1e-4)


@pytest.mark.parametrize("scale, shift", [(1e9, 1e9), (1e-9, 0.0), (1e-9, 5e-9)])
def test_extreme_scales_give_the_rescaled_fit(frame, scale, shift):
    base = sparsemix.lmer(F, frame)
    fit = sparsemix.lmer(F, frame.assign(y=scale * frame.y + shift))
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fit.fe_params, scale * base.fe_params + np.array([shift, 0.0]), rtol=1e-6)
    assert fit.sigma == pytest.approx(scale * base.sigma, rel=1e-6)
    nu = base.nobs - len(base.fe_params)  # REML: the criterion shifts by nu log(scale)
    assert fit.llf == pytest.approx(base.llf - nu * np.log(scale), rel=1e-9)


def test_unicode_and_spaced_column_names(frame):
    d = frame.rename(columns={"x": "dose (mg)", "g": "Prüfer", "h": "site id"})
    fit = sparsemix.lmer("y ~ `dose (mg)` + (1 | Prüfer) + (1 | `site id`)", d)
    reference = sparsemix.lmer(F, frame)
    assert fit.llf == pytest.approx(reference.llf, rel=1e-12)
    assert list(fit.fe_params.index) == ["(Intercept)", "`dose (mg)`"]
    assert set(fit.ngroups) == {"Prüfer", "site id"}
    same = sparsemix.lmer('y ~ Q("dose (mg)") + (1 | Prüfer) + (1 | `site id`)', d)
    assert same.llf == pytest.approx(reference.llf, rel=1e-12)


def test_empty_data(frame):
    with pytest.raises(InputError, match="no rows"):
        sparsemix.lmer(F, frame.iloc[:0])
    with pytest.raises(InputError, match="no rows"):
        sparsemix.lmer(F, frame.assign(x=np.nan))


def test_a_formula_cannot_run_code(frame, tmp_path):
    marker = tmp_path / "ran"
    for formula in (
        f'y ~ __import__("pathlib").Path("{marker}").touch() + (1 | g)',
        f'y ~ x + (1 + __import__("pathlib").Path("{marker}").touch() | g)',
        f"y ~ exec(\"open('{marker}', 'w')\") + (1 | g)",
        "y ~ (lambda v: v)(x) + (1 | g)",
        "y ~ x.__class__ + (1 | g)",
    ):
        with pytest.raises(FormulaError, match="not (allowed|a column)|attribute|syntax|cannot read"):
            sparsemix.lmer(formula, frame)
    assert not marker.exists()
    with pytest.raises(FormulaError):
        sparsemix.MixedLM.from_formula(f'y ~ __import__("pathlib").Path("{marker}").touch()', frame, groups="g")
    assert not marker.exists()


def test_allowed_functions_work_without_numpy_in_scope(frame):
    d = frame.assign(z=np.exp(frame.x))
    fit = sparsemix.lmer("y ~ log(z) + (1 | g) + (1 | h)", d)
    assert fit.llf == pytest.approx(sparsemix.lmer(F, frame).llf, rel=1e-10)
    # (ML below: the REML criterion depends on the scale of X's columns, the likelihood does not)
    # Own functions come in through eval_env, a choice made in code.
    import patsy

    env = patsy.EvalEnvironment([{"double": lambda v: 2 * v}])
    fit2 = sparsemix.lmer("y ~ double(x) + (1 | g) + (1 | h)", frame, eval_env=env, reml=False)
    assert fit2.llf == pytest.approx(sparsemix.lmer(F, frame, reml=False).llf, rel=1e-10)
    assert fit2.fe_params.iloc[1] == pytest.approx(sparsemix.lmer(F, frame, reml=False).fe_params["x"] / 2, rel=1e-6)


def test_poly_matches_the_raw_polynomial_fit(frame):
    # ML: the REML criterion depends on the parameterization of X, the likelihood does not
    fit = sparsemix.lmer("y ~ poly(x, 3) + (1 | g) + (1 | h)", frame, reml=False)
    raw = sparsemix.lmer("y ~ x + I(x**2) + I(x**3) + (1 | g) + (1 | h)", frame, reml=False)
    assert fit.llf == pytest.approx(raw.llf, rel=1e-10)
    P = fit.design.X[:, 1:]
    np.testing.assert_allclose(P.T @ P, np.eye(3), atol=1e-10)  # orthonormal columns, as R's poly
    np.testing.assert_allclose(P.sum(axis=0), 0.0, atol=1e-10)
    # New data goes through the training data's recurrence: the same rows give the same columns.
    new = frame.iloc[:5].copy()
    np.testing.assert_allclose(
        fit.predict(new, include_random=False), P[:5] @ fit.fe_params.to_numpy()[1:] + fit.fe_params.iloc[0], rtol=1e-10
    )


@pytest.mark.slow
def test_ten_million_level_factor_is_refused_before_the_model_is_built():
    n = 10_000_000
    data = pd.DataFrame({"y": np.random.default_rng(0).normal(size=n), "g": np.arange(n, dtype=np.int64)})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match="10000000 levels for 10000000 observations"):
        sparsemix.lmer("y ~ 1 + (1 | g)", data)
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    # Z alone would take 240 MB and Z'Z and the factor more; the check costs the codes and the fixed part.
    assert grown_gb < 1.5


@pytest.mark.parametrize(
    "formula, scale",
    [
        ("y ~ (0 + x | g)", 1e200),
        ("y ~ x + (x | g)", 1e120),
        ("y ~ x + (1 | g) + (0 + z | h)", -1e150),
        ("y ~ x + (1 + I(x * 1e90) | g)", 1e20),
    ],
)
def test_a_random_slope_on_a_covariate_whose_squares_overflow_is_refused(frame, formula, scale):
    """Found by tests/test_fuzz.py: a slope on a covariate of size 1e200 reached numpy's LinAlgError (singular
    matrix) in the relative covariance."""
    d = frame.assign(x=frame.x * scale, z=frame.x * scale)
    with pytest.raises(InputError, match=r"random-effects term .* has values as large as .*overflow.*Rescale"):
        _quiet_fit(formula, d)


@pytest.mark.parametrize("formula", ["y ~ x + (0 + x | g)", "y ~ x + (x | g)"])
def test_an_infinite_value_of_a_random_slope_is_named(frame, formula):
    d = frame.assign(x=frame.x.where(frame.index != 7, np.inf))
    with pytest.raises(InputError, match=r"contains infinite values in 1 row\(s\) \(first at row 7\)"):
        _quiet_fit(formula, d)


def test_a_slope_on_a_covariate_of_size_1e90_still_fits(frame):
    base = _quiet_fit("y ~ x + (0 + x | g)", frame, reml=False)
    big = _quiet_fit("y ~ x + (0 + x | g)", frame.assign(x=frame.x * 1e90), reml=False)
    assert big.llf == pytest.approx(base.llf, rel=1e-6)


def test_a_condition_as_the_response_is_rs_logical_response(frame):
    """`I(y > 0) ~ ...`: R's logical response, 0/1 (patsy alone reads the booleans as a factor of two columns)."""
    coded = frame.assign(positive=(frame.y > 0).astype(int))
    for fit, kwargs in ((sparsemix.glmer, {"family": "binomial"}), (sparsemix.lmer, {})):
        by_condition = fit("I(y > 0) ~ x + (1 | g)", frame, **kwargs)
        assert by_condition.llf == pytest.approx(fit("positive ~ x + (1 | g)", coded, **kwargs).llf, rel=1e-12)
    mixed = sparsemix.MixedLM.from_formula("I(y > 0) ~ x", frame, groups="g").fit()
    assert mixed.llf == pytest.approx(sparsemix.MixedLM.from_formula("positive ~ x", coded, groups="g").fit().llf)
    with pytest.raises(sparsemix.FormulaError, match="expands to 3 columns"):  # a factor stays refused
        sparsemix.lmer("C(g % 3) ~ x + (1 | h)", frame)
