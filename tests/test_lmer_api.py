"""The lme4-style interface: predictions, simulation, bootstrap, anova, weights, missing rows, errors."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import reference_data

import sparsemix as sm
from sparsemix.errors import MissingExtraError

SLEEP = reference_data("sleepstudy")


@pytest.fixture(scope="module")
def fm1():
    return sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)


def test_predict_on_the_fitted_rows_equals_fitted(fm1):
    np.testing.assert_allclose(fm1.predict(SLEEP), fm1.fitted, rtol=1e-12)
    np.testing.assert_allclose(fm1.predict(), fm1.fitted, rtol=1e-12)
    np.testing.assert_allclose(fm1.resid, SLEEP.Reaction - fm1.fitted, rtol=1e-12)


def test_predict_new_levels_at_population_level(fm1):
    new = pd.DataFrame({"Days": [0.0, 5.0], "Subject": ["nobody", "nobody"]})
    population = fm1.fe_params["(Intercept)"] + fm1.fe_params["Days"] * new.Days
    with pytest.warns(sm.NewLevelWarning, match="2 of 2 row"):
        np.testing.assert_allclose(fm1.predict(new), population, rtol=1e-12)
    np.testing.assert_allclose(fm1.predict(new, include_random=False), population, rtol=1e-12)
    with pytest.raises(sm.InputError, match="allow_new_levels"):
        fm1.predict(new, allow_new_levels=False)


def test_predict_existing_level_adds_its_random_effects(fm1):
    re = fm1.ranef(condvar=False)["Subject"].loc["308"]
    new = pd.DataFrame({"Days": [3.0], "Subject": ["308"]})
    expected = fm1.fe_params["(Intercept)"] + re["(Intercept)"] + 3.0 * (fm1.fe_params["Days"] + re["Days"])
    assert fm1.predict(new).iloc[0] == pytest.approx(expected, rel=1e-12)


def test_simulate_is_reproducible_and_centred(fm1):
    a = fm1.simulate(200, seed=3)
    b = fm1.simulate(200, seed=3)
    assert a.shape == (180, 200)
    pd.testing.assert_frame_equal(a, b)
    population = fm1.predict(include_random=False)
    # Each row's mean over simulations is near X beta, within 4.5 standard errors of its model variance
    # z' Psi z + sigma^2 (z = (1, Days)).
    psi = fm1.fit_result.covariances()[0]
    z = np.column_stack([np.ones(len(SLEEP)), SLEEP.Days])
    sd = np.sqrt(np.einsum("ij,jk,ik->i", z, psi, z) + fm1.scale)
    assert np.all(np.abs(a.mean(axis=1) - population) < 4.5 * sd / np.sqrt(200))
    # ... and the spread across simulations matches that variance (chi-square: 200 draws, 15% is ~2 sd).
    np.testing.assert_allclose(a.std(axis=1, ddof=1).mean(), sd.mean(), rtol=0.15)


def test_bootstrap_does_not_depend_on_the_number_of_workers(fm1):
    serial = fm1.bootstrap(nsim=8, seed=11, n_jobs=1)
    parallel = fm1.bootstrap(nsim=8, seed=11, n_jobs=2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert list(serial.columns) == fm1.sdcor_names + ["(Intercept)", "Days"]


def test_bootstrap_intervals_bracket_the_estimates(fm1):
    ci = fm1.confint("boot", nsim=100, seed=5)
    est = pd.concat([fm1.sdcor, fm1.fe_params])
    assert np.all((ci.lower <= est) & (est <= ci.upper))


def test_wald_intervals(fm1):
    ci = fm1.confint("wald")
    assert ci.loc["sigma"].isna().all()
    np.testing.assert_allclose(
        ci.loc["Days"], fm1.fe_params["Days"] + np.array([-1, 1]) * 1.959963984540054 * fm1.bse_fe["Days"], rtol=1e-12
    )


def test_anova_refits_by_ml_and_tests_the_difference(fm1):
    fm0 = sm.lmer("Reaction ~ Days + (Days || Subject)", SLEEP)
    table = sm.anova(fm1, fm0, names=["corr", "uncorr"])
    assert list(table.index) == ["uncorr", "corr"]  # ordered by number of parameters
    assert table.attrs["refit"]
    ml1, ml0 = fm1.refit_ml(), fm0.refit_ml()
    assert table.loc["corr", "Chisq"] == pytest.approx(2 * (ml1.llf - ml0.llf), rel=1e-10)
    assert table.loc["corr", "Df"] == 1
    assert table.loc["corr", "logLik"] == pytest.approx(ml1.llf)


def test_anova_refuses_models_of_other_data(fm1):
    other = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP.iloc[:170])
    with pytest.raises(sm.InputError, match="other data"):
        sm.anova(fm1, other)


def test_ml_refit_reuses_the_design(fm1):
    ml = fm1.refit_ml()
    direct = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP, reml=False)
    assert ml.llf == pytest.approx(direct.llf, abs=1e-7)
    assert not ml.reml and ml.aic == pytest.approx(-2 * ml.llf + 2 * 6)


def test_incomplete_rows_are_dropped_and_counted():
    df = SLEEP.copy()
    df.loc[[0, 5, 9], "Reaction"] = np.nan
    df.loc[[12], "Subject"] = None
    m = sm.lmer("Reaction ~ Days + (Days | Subject)", df)
    complete = sm.lmer("Reaction ~ Days + (Days | Subject)", df.dropna(subset=["Reaction", "Subject"]))
    assert m.nobs == 176 and m.design.n_dropped == 4
    assert m.llf == pytest.approx(complete.llf, rel=1e-12)
    assert "4 observation(s) deleted" in str(m.summary())


def test_aliased_fixed_effects_are_dropped_and_named():
    df = SLEEP.assign(Days2=SLEEP.Days * 2.0)
    with pytest.warns(sm.RankDeficiencyWarning, match="Days2"):
        m = sm.lmer("Reaction ~ Days + Days2 + (1 | Subject)", df)
    assert list(m.fe_params.index) == ["(Intercept)", "Days"]


def test_weights_equal_replicated_rows():
    # Integer prior weights are frequency weights for the fixed effects and residual variance: the weighted
    # REML criterion of data whose rows all have weight 2 equals that of sigma^2 halved.
    m1 = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP, reml=False)
    m2 = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP.assign(w=2.0), weights="w", reml=False)
    assert m2.scale == pytest.approx(2 * m1.scale, rel=1e-6)
    np.testing.assert_allclose(m2.fe_params, m1.fe_params, rtol=1e-6)


def test_offset_shifts_the_intercept():
    m1 = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP)
    m2 = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP.assign(off=100.0), offset="off")
    assert m2.fe_params["(Intercept)"] == pytest.approx(m1.fe_params["(Intercept)"] - 100, rel=1e-9)
    assert m2.llf == pytest.approx(m1.llf, rel=1e-10)
    np.testing.assert_allclose(m2.fitted, m1.fitted, rtol=1e-10)


@pytest.mark.parametrize(
    "formula, error, message",
    [
        ("Reaction ~ Days", sm.FormulaError, "no random-effects term"),
        ("Reaction ~ Days + (1 | Subjct)", sm.InputError, "Did you mean 'Subject'"),
        ("Reaction ~ Dayz + (1 | Subject)", sm.FormulaError, "Did you mean 'Days'"),
    ],
)
def test_bad_formulas(formula, error, message):
    with pytest.raises(error, match=message):
        sm.lmer(formula, SLEEP)


def test_plots_name_the_extra_when_matplotlib_is_missing(fm1, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    import sys

    for name in [m for m in sys.modules if m.startswith("matplotlib")]:  # imported by an earlier test
        monkeypatch.delitem(sys.modules, name)
    from sparsemix.plots import caterpillar

    with pytest.raises(MissingExtraError, match=r"pip install 'sparsemix\[plot\]'"):
        caterpillar(fm1)


def test_plots_draw_one_panel_per_column(fm1):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from sparsemix.plots import caterpillar, profile_plot

    assert len(caterpillar(fm1).axes) == 2
    prof = fm1.profile(which=["sigma", "Days"])
    assert len(profile_plot(prof).axes) == 2


@pytest.mark.parametrize(
    "formula, re_formula",
    [
        ("y ~ x + (0 + C(f) | g)", "0 + C(f)"),  # sparse indicator path
        ("y ~ x + (f | g)", "1 + C(f)"),  # patsy path: intercept and treatment contrasts
    ],
)
def test_factor_slopes_match_statsmodels(formula, re_formula):
    smf = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(25), 12)
    f = np.tile(np.array(["a", "b", "c"]), 100)
    u = rng.multivariate_normal([0, 0, 0], [[2, 1, 0.5], [1, 2, 1], [0.5, 1, 2]], size=25)
    x = rng.normal(size=300)
    y = 1 + x + u[g, pd.factorize(f, sort=True)[0]] + rng.normal(size=300)
    df = pd.DataFrame({"y": y, "x": x, "g": g, "f": f})
    ours = sm.lmer(formula, df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = smf.MixedLM.from_formula("y ~ x", df, re_formula=re_formula, groups="g").fit()
    assert ours.llf >= ref.llf - 1e-6 * abs(ref.llf)
    assert ours.llf == pytest.approx(ref.llf, abs=1e-2)
    np.testing.assert_allclose(ours.fe_params.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-3)
    assert ours.variance_components().query("grp == 'g' and var2.isna()").shape[0] == 3


def test_caret_is_a_power_as_in_r():
    m = sm.lmer("Reaction ~ Days + I(Days^2) + (1 | Subject)", SLEEP)
    ref = sm.lmer("Reaction ~ Days + I(Days**2) + (1 | Subject)", SLEEP)
    # lme4 1.1-31 gives 0.337022 for I(Days^2) on these data (docs/lme4.md).
    assert m.fe_params.iloc[2] == pytest.approx(ref.fe_params.iloc[2], rel=1e-12)
    assert m.fe_params.iloc[2] == pytest.approx(0.337022, abs=1e-5)


def test_optimizer_names_are_shared_with_mixedlm_and_checked(fm1):
    for name in ("lbfgs", "nm", "powell", "bobyqa"):
        m = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP, optimizer=name)
        assert m.llf <= fm1.llf + 1e-6
    with pytest.raises(sm.InputError, match="optimizer 'newuoa' is not available"):
        sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP, optimizer="newuoa")
    assert (
        sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP, optimizer="nm").refit_ml().fit_result.optimization.method
        == "Nelder-Mead"
    )


def test_text_columns_of_the_fixed_part_reach_patsy_as_categoricals():
    """Object and pandas' str dtype (the default for text from pandas 3 on) alike: patsy then reads codes, from the
    frame (where a caller's function reads it) or from the columns patsy is given otherwise."""
    from sparsemix.formula.mixedlm import FrameColumns, strings_as_categories

    data = SLEEP.assign(half=np.where(SLEEP.Days < 5, "early", "late"))
    as_str = data.assign(half=data.half.astype("str"))
    as_object = data.assign(half=data.half.astype(object))
    for frame in (as_str, as_object):
        for column in (strings_as_categories(frame, "Reaction ~ half").half, FrameColumns(frame)["half"]):
            assert isinstance(column.dtype, pd.CategoricalDtype)
            assert list(column.categories if hasattr(column, "categories") else column.cat.categories) == [
                "early",
                "late",
            ]
            np.testing.assert_array_equal(np.asarray(column), frame.half.to_numpy(dtype=object))
    fits = [sm.lmer("Reaction ~ half + (1 | Subject)", frame) for frame in (as_str, as_object)]
    assert list(fits[0].fe_params.index) == ["(Intercept)", "half[T.late]"]
    np.testing.assert_array_equal(fits[0].fe_params, fits[1].fe_params)


def test_frame_columns_reads_each_column_as_pandas_lookup_does(monkeypatch):
    """FrameColumns.column's own read of a column (pandas' lookup without its label search) gives frame[name] for
    every dtype a model reads; duplicated labels, a frame with no rows and a label naming no column take pandas'
    lookup, and its error."""
    from sparsemix.formula.mixedlm import FrameColumns

    n = 6
    frame = pd.DataFrame(
        {
            "x": np.arange(n, dtype=float),
            "i": np.arange(n),
            "s": pd.array(list("abcabc"), dtype="str"),
            "o": np.array(list("abcabc"), dtype=object),
            "c": pd.Categorical(list("abcabc"), categories=["c", "b", "a"]),
            "b": np.arange(n) % 2 == 0,
            "nb": pd.array([True, False, None] * 2, dtype="boolean"),
            "ni": pd.array([1, None, 3] * 2, dtype="Int64"),
            "t": pd.date_range("2020-01-01", periods=n),
        },
        index=pd.Index(list("uvwxyz"), name="row"),
    )
    frame.attrs["note"] = "kept by the frame"
    for source in (frame, frame.iloc[2:], frame.iloc[:0]):
        columns = FrameColumns(source)
        for name in source.columns:
            pd.testing.assert_series_equal(columns.column(name), source[name])
            assert columns.column(name) is columns.column(name)  # read once
    doubled = pd.concat([frame[["x"]], frame[["x", "s"]]], axis=1)
    pd.testing.assert_frame_equal(FrameColumns(doubled).column("x"), doubled["x"])
    pd.testing.assert_series_equal(FrameColumns(doubled).column("s"), doubled["s"])
    with pytest.raises(KeyError):
        FrameColumns(frame).column("absent")
    if hasattr(pd.DataFrame, "_constructor_sliced_from_mgr"):  # pandas 2.1 on: its own read, not the lookup
        with monkeypatch.context() as patched:
            patched.setattr(pd.DataFrame, "__getitem__", lambda self, key: pytest.fail("pandas' lookup"))
            assert FrameColumns(frame).column("s").tolist() == list("abcabc")


def test_text_codes_are_kept_by_the_arrow_array_they_were_read_from():
    """sorted_codes' results for pandas' Arrow-backed text are kept while its array lives: the same codes on the next
    read (copies: a caller's change does not reach them), new ones once a value of the column is changed (pandas
    replaces the array), none kept after the frame is gone; a refit after the change uses the changed labels."""
    import gc

    from sparsemix.formula import mixedlm

    pytest.importorskip("pyarrow")
    frame = SLEEP.assign(
        half=pd.array(np.where(SLEEP.Days < 5, "early", "late"), dtype=pd.StringDtype("pyarrow", na_value=np.nan))
    )
    if mixedlm._arrow_text(frame.half) is None:
        pytest.skip("pandas keeps this text outside Arrow")
    codes, levels = mixedlm.sorted_codes(frame.half)
    np.testing.assert_array_equal(codes, (SLEEP.Days >= 5).to_numpy(int))
    assert list(levels) == ["early", "late"]
    key = id(mixedlm._arrow_text(frame.half))
    assert key in mixedlm._KEPT_CODES
    codes[:] = 7  # (the caller's copy)
    again, _ = mixedlm.sorted_codes(frame.half)
    np.testing.assert_array_equal(again, (SLEEP.Days >= 5).to_numpy(int))
    before = sm.lmer("Reaction ~ half + (1 | Subject)", frame).fe_params
    frame.loc[frame.Days == 9, "half"] = "end"
    codes, levels = mixedlm.sorted_codes(frame.half)
    assert list(levels) == ["early", "end", "late"] and codes.max() == 2
    after = sm.lmer("Reaction ~ half + (1 | Subject)", frame).fe_params
    assert list(before.index) == ["(Intercept)", "half[T.late]"]
    assert list(after.index) == ["(Intercept)", "half[T.end]", "half[T.late]"]
    column = pd.Series(pd.array(["b", "a", "b"], dtype=pd.StringDtype("pyarrow", na_value=np.nan)))
    key = id(mixedlm._arrow_text(column))
    mixedlm.sorted_codes(column)
    assert key in mixedlm._KEPT_CODES
    del column
    gc.collect()
    assert key not in mixedlm._KEPT_CODES


def test_fixed_effects_come_in_rs_order_and_predict_reads_them_so():
    """R's model.matrix order (terms by their number of factors, then as written), not patsy's (terms without
    numeric factors first); predictions from newdata put their columns in the same order; an aliased column is
    dropped where lme4 drops it: the later one in R's order."""
    data = SLEEP.assign(half=np.where(SLEEP.Days < 5, "early", "late"), late=(SLEEP.Days >= 5).astype(float))
    m = sm.lmer("Reaction ~ Days + half + Days:half + (1 | Subject)", data)
    assert list(m.fe_params.index) == ["(Intercept)", "Days", "half[T.late]", "Days:half[T.late]"]
    np.testing.assert_allclose(m.predict(data), m.fitted, rtol=1e-12)
    # late is half's indicator: lme4 keeps the first written (late) and drops half (patsy's order dropped late)
    with pytest.warns(sm.RankDeficiencyWarning, match=r"half\[T.late\]"):
        aliased = sm.lmer("Reaction ~ Days + late + half + (1 | Subject)", data)
    assert list(aliased.fe_params.index) == ["(Intercept)", "Days", "late"]
    np.testing.assert_allclose(aliased.predict(data), aliased.fitted, rtol=1e-12)


def test_theta_names_follow_lme4_for_split_terms():
    m = sm.lmer("Reaction ~ Days + (Days || Subject)", SLEEP)
    assert m.theta_names == ["Subject.(Intercept)", "Subject.Days"]
    assert m.sdcor_names == ["sd_(Intercept)|Subject", "sd_Days|Subject", "sigma"]


def test_predict_names_a_missing_grouping_column(fm1):
    with pytest.raises(sm.InputError, match="'Subject'"):
        fm1.predict(pd.DataFrame({"Days": [3.0]}))


def test_fit_log_and_verbose_progress(capsys):
    m = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP, verbose=True)
    log = m.fit_log
    assert list(log.columns) == ["evaluation", "deviance", "seconds"]
    assert np.all(np.diff(log.deviance) < 0) and np.all(np.diff(log.seconds) >= 0)
    assert log.deviance.iloc[-1] == pytest.approx(m.deviance, rel=1e-12)
    assert log.evaluation.iloc[-1] <= m.n_evaluations
    err = capsys.readouterr().err
    assert err.startswith("sparsemix: evaluation     1  deviance")
    quiet = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)
    assert capsys.readouterr().err == "" and len(quiet.fit_log) == len(log)


# -- one model, many responses: refit(y) and lmer_many (issue 16) -----------------------------------------------

PENICILLIN = reference_data("penicillin")
_RNG = np.random.default_rng(16)
_SLEEP_WEIGHTED = SLEEP.assign(w=_RNG.uniform(0.5, 2.0, len(SLEEP)), off=_RNG.normal(0.0, 20.0, len(SLEEP)))
REFIT_MODELS = {
    "slopes": ("Reaction ~ Days + (Days | Subject)", SLEEP, {}),
    "crossed": ("diameter ~ 1 + (1 | plate) + (1 | sample)", PENICILLIN, {}),
    "weighted": ("Reaction ~ Days + (Days | Subject)", _SLEEP_WEIGHTED, {"weights": "w"}),
    "offset ML": ("Reaction ~ Days + (1 | Subject)", _SLEEP_WEIGHTED, {"offset": "off", "reml": False}),
}


def _assert_same_fit(a, b, theta_tol=1e-7):
    assert a.llf == pytest.approx(b.llf, rel=1e-10)
    np.testing.assert_allclose(a.fe_params, b.fe_params, rtol=1e-8, atol=1e-8 * np.abs(b.fe_params).max())
    np.testing.assert_allclose(a.theta, b.theta, rtol=theta_tol, atol=theta_tol)
    assert a.scale == pytest.approx(b.scale, rel=1e-7)


@pytest.mark.parametrize("name", list(REFIT_MODELS))
def test_refit_equals_a_fresh_fit_of_the_new_response(name):
    formula, data, kwargs = REFIT_MODELS[name]
    m = sm.lmer(formula, data, **kwargs)
    response = formula.split("~")[0].strip()
    for column in m.simulate(3, seed=7):
        y = m.simulate(3, seed=7)[column].to_numpy()
        refitted = m.refit(y)
        fresh = sm.lmer(formula, data.assign(**{response: y}), **kwargs)
        _assert_same_fit(refitted, fresh)
        np.testing.assert_allclose(refitted.fitted, fresh.fitted, rtol=1e-8)
        assert refitted.reml == m.reml and refitted.nobs == m.nobs
        np.testing.assert_array_equal(refitted.design.y, y)


@pytest.mark.parametrize("name", list(REFIT_MODELS))
def test_refit_of_the_fitted_response_reproduces_the_fit(name):
    formula, data, kwargs = REFIT_MODELS[name]
    m = sm.lmer(formula, data, **kwargs)
    _assert_same_fit(m.refit(m.design.y), m, theta_tol=1e-8)


def test_refits_hand_the_factorization_on_and_leave_earlier_results_usable(fm1):
    sims = fm1.simulate(3, seed=1)
    first = fm1.refit(sims["sim_1"])
    llf, ranef = first.llf, first.ranef()["Subject"]
    later = [fm1.refit(sims[c]) for c in sims]  # each takes the analysed factor over from the one before
    assert later[0].llf == pytest.approx(llf, rel=1e-12)
    # the earlier results rebuild their factorization on use: the same numbers
    pd.testing.assert_frame_equal(first.ranef()["Subject"], ranef, rtol=1e-10)
    np.testing.assert_allclose(fm1.ranef()["Subject"], sm.lmer(fm1.design.formula, SLEEP).ranef()["Subject"])


@pytest.mark.parametrize(
    "y, message",
    [
        (np.ones(10), "10 values but the model was fitted to 180 rows"),
        (np.r_[np.nan, np.arange(179.0)], "NaN"),
        (np.r_[np.inf, np.arange(179.0)], "infinite"),
        (np.array(["a"] * 180), "must hold numbers"),
        (np.full(180, 3.0), "constant"),
        (np.ones((180, 2)), "one-dimensional"),
        (5.0, "vector of 180 numbers"),
        ("Reaction", "vector of 180 numbers"),
    ],
)
def test_refit_checks_the_response(fm1, y, message):
    with pytest.raises(sm.InputError, match=message):
        fm1.refit(y)


def test_lmer_many_equals_lmer_per_response():
    sims = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP).simulate(3, seed=4)
    for responses in (sims, sims.to_numpy(), [sims[c].to_numpy() for c in sims]):
        fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, responses)
        assert len(fits) == 3
        for fit, column in zip(fits, sims):
            _assert_same_fit(fit, sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=sims[column].to_numpy())))
            assert list(fit.fe_params.index) == ["(Intercept)", "Days"]


def test_lmer_many_drops_the_rows_lmer_drops():
    df = SLEEP.copy()
    df.loc[[3, 40], "Days"] = np.nan
    sims = sm.lmer("Reaction ~ Days + (1 | Subject)", SLEEP).simulate(2, seed=9)
    fits = sm.lmer_many("y ~ Days + (1 | Subject)", df, sims, reml=False)
    for fit, column in zip(fits, sims):
        assert fit.nobs == 178
        _assert_same_fit(fit, sm.lmer("y ~ Days + (1 | Subject)", df.assign(y=sims[column]), reml=False))


@pytest.mark.parametrize(
    "formula, responses, message",
    [
        ("y ~ Days + (1 | Subject)", np.ones((10, 2)), "10 rows but data has 180"),
        ("y ~ Days + (1 | Subject)", "y", "list of vectors"),
        ("y ~ Days + (1 | Subject)", [], "empty"),
        ("y ~ Days + (1 | Subject)", [np.arange(180.0), np.arange(5.0)], "response 1 has shape"),
        ("y ~ Days + (1 | Subject)", [np.r_[np.nan, np.arange(179.0)]], "response 0 has missing"),
        # (response 0 is not one the model reproduces exactly, as np.arange(180) is: that fit is refused first)
        ("y ~ Days + (1 | Subject)", [np.sin(np.arange(180.0)), np.r_[np.nan, np.arange(179.0)]], "response 1"),
        ("log(y) ~ Days + (1 | Subject)", [np.arange(1.0, 181.0)], "not a plain name"),
        # checked together as one matrix: the column that fails is named, with what is wrong with it
        (
            "y ~ Days + (1 | Subject)",
            [np.sin(np.arange(180.0)), np.cos(np.arange(180.0)), np.full(180, 3.0)],
            "response 2' is constant",
        ),
        ("y ~ Days + (1 | Subject)", [np.sin(np.arange(180.0)), 1e150 * np.cos(np.arange(180.0))], "would overflow"),
        (
            "y ~ Days + (1 | Subject)",
            pd.DataFrame({"a": np.sin(np.arange(180.0)), "b": ["x"] * 180}),
            "response 1 must be numeric",
        ),
    ],
)
def test_lmer_many_checks_the_responses(formula, responses, message):
    with pytest.raises(sm.InputError, match=message):
        sm.lmer_many(formula, SLEEP, responses)


def test_bootstrap_estimates_match_fresh_fits_of_the_simulated_responses(fm1):
    """Bootstrap refits (fitted together, or one at a time without the final Newton steps: ~1e-5) agree with full
    fits of the same responses, rebuilt here from the replicates' seeds as parametric_bootstrap draws them."""
    from sparsemix.inference.bootstrap import simulate_responses

    draws = fm1.bootstrap(nsim=4, seed=21, n_jobs=1)
    for seed_seq, (_, row) in zip(np.random.SeedSequence(21).spawn(4), draws.iterrows()):
        y = simulate_responses(
            fm1.design.X,
            fm1._Z,
            fm1.fit_result.system.relcov,
            fm1.theta,
            fm1.fit_result.beta,
            fm1.sigma,
            None,
            np.random.default_rng(seed_seq),
            1,
        )[:, 0]
        fresh = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP.assign(Reaction=y))
        expected = pd.concat([fresh.sdcor, fresh.fe_params])
        np.testing.assert_allclose(row[expected.index], expected, rtol=2e-5, atol=2e-5)


def test_refitted_results_and_their_source_pickle(fm1):
    import pickle

    refitted = fm1.refit(fm1.simulate(1, seed=3)["sim_1"])
    for results in (refitted, fm1):
        back = pickle.loads(pickle.dumps(results))
        assert back.llf == pytest.approx(results.llf, rel=1e-12)
        np.testing.assert_allclose(back.ranef()["Subject"], results.ranef()["Subject"], rtol=1e-10)


# -- lme4's response arithmetic and offset() terms (issue 17 asked for them in lmer too) -------------------------------


def test_arithmetic_on_the_left_hand_side_is_evaluated_as_r_does():
    halved = sm.lmer("Reaction / 2 ~ Days + (Days | Subject)", SLEEP)
    direct = sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=SLEEP.Reaction / 2))
    assert halved.llf == pytest.approx(direct.llf, rel=1e-12)
    np.testing.assert_allclose(halved.fe_params, direct.fe_params, rtol=1e-10)


def test_an_offset_term_in_the_formula_is_the_offset_argument():
    data = SLEEP.assign(off=0.5 * SLEEP.Days**2)
    a = sm.lmer("Reaction ~ Days + offset(off) + (Days | Subject)", data)
    b = sm.lmer("Reaction ~ Days + (Days | Subject)", data, offset="off")
    assert a.llf == pytest.approx(b.llf, rel=1e-12)
    assert list(a.fe_params.index) == ["(Intercept)", "Days"]
    np.testing.assert_allclose(a.fe_params, b.fe_params, rtol=1e-10)
    new = data.iloc[[0, 11, 50]]
    np.testing.assert_allclose(a.predict(new), b.predict(new, offset=new.off), rtol=1e-12)
    np.testing.assert_allclose(a.predict(), b.predict(), rtol=1e-12)
