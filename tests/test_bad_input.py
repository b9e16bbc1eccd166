"""Bad input: each case raises a sparsemix error (a ValueError) that names the problem and the fix."""

import numpy as np
import pandas as pd
import pytest

import sparsemix as sm


@pytest.fixture
def df():
    rng = np.random.default_rng(0)
    n = 60
    g = np.repeat(np.arange(6), 10)
    x = rng.normal(size=n)
    return pd.DataFrame(
        {"y": 1 + x + rng.normal(size=6)[g] + rng.normal(size=n), "x": x, "g": g, "label": ["a", "b"] * 30}
    )


def _arrays(df):
    return df["y"].to_numpy(copy=True), np.column_stack([np.ones(len(df)), df["x"]]), df["g"].to_numpy(copy=True)


def test_errors_are_value_errors():
    assert issubclass(sm.SparsemixError, ValueError)
    for cls in (sm.InputError, sm.MissingDataError, sm.RankDeficientError, sm.FormulaError):
        assert issubclass(cls, sm.SparsemixError)


def test_missing_column_in_formula_suggests_the_closest(df):
    with pytest.raises(sm.FormulaError, match=r"'xx'.*Did you mean 'x'"):
        sm.MixedLM.from_formula("y ~ xx", groups="g", data=df)


def test_missing_group_column_suggests_the_closest(df):
    with pytest.raises(sm.InputError, match=r"'gg'.*Did you mean 'g'"):
        sm.MixedLM.from_formula("y ~ x", groups="gg", data=df)


def test_missing_column_in_vc_formula(df):
    with pytest.raises(sm.FormulaError, match=r"vc_formula\['v'\].*'sub'"):
        sm.MixedLM.from_formula("y ~ x", groups="g", re_formula="1", vc_formula={"v": "0 + C(sub)"}, data=df)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["endog", "exog"])
def test_nan_or_inf_with_missing_none(df, bad, where):
    y, X, g = _arrays(df)
    (y if where == "endog" else X)[7, -1 if where == "exog" else ...] = bad
    with pytest.raises(sm.MissingDataError, match=rf"{where} contains .* row 7.*missing='drop'"):
        sm.MixedLM(y, X, g)


def test_nan_in_formula_column_with_missing_none(df):
    df.loc[3, "x"] = np.nan
    with pytest.raises(sm.MissingDataError, match=r"'x'.*missing='drop'"):
        sm.MixedLM.from_formula("y ~ x", groups="g", data=df)


def test_nan_in_exog_re_is_an_error_not_a_nan_fit(df):
    y, X, g = _arrays(df)
    Z = X.copy()
    Z[5, 1] = np.nan
    with pytest.raises(sm.MissingDataError, match="exog_re"):
        sm.MixedLM(y, X, g, exog_re=Z)


def test_non_numeric_endog(df):
    _, X, g = _arrays(df)
    with pytest.raises(sm.InputError, match=r"endog must be numeric.*'a'"):
        sm.MixedLM(df["label"].to_numpy(), X, g)


def test_non_numeric_response_in_formula(df):
    with pytest.raises(sm.FormulaError, match="response .* one numeric column"):
        sm.MixedLM.from_formula("label ~ x", groups="g", data=df)


@pytest.mark.parametrize("length", [59, 61])
def test_groups_of_the_wrong_length(df, length):
    y, X, _ = _arrays(df)
    with pytest.raises(sm.InputError, match=rf"groups has {length} rows but endog has 60"):
        sm.MixedLM(y, X, np.arange(length) % 6)


def test_rank_deficient_exog_names_the_aliased_column(df):
    y, _, g = _arrays(df)
    X = pd.DataFrame({"const": 1.0, "x": df["x"], "x2": 2 * df["x"]})
    with pytest.raises(sm.RankDeficientError, match=r"'x2' is a linear combination"):
        sm.MixedLM(y, X, g)


def test_rank_deficient_formula(df):
    df["x3"] = df["x"] * 3 + 1
    with pytest.raises(sm.RankDeficientError, match="'x3'"):
        sm.MixedLM.from_formula("y ~ x + x3", groups="g", data=df)


def test_empty_frame(df):
    with pytest.raises(sm.InputError, match="no rows"):
        sm.MixedLM.from_formula("y ~ x", groups="g", data=df.iloc[:0])


def test_empty_arrays():
    with pytest.raises(sm.InputError, match="no rows"):
        sm.MixedLM(np.zeros(0), np.zeros((0, 1)), np.zeros(0))


def test_all_rows_dropped(df):
    df["y"] = np.nan
    with pytest.raises(sm.InputError, match="no rows"):
        sm.MixedLM.from_formula("y ~ x", groups="g", data=df, missing="drop")


def test_grouping_factor_with_one_level(df):
    with pytest.raises(sm.InputError, match=r"only 1 level.*Remove that random effect"):
        sm.MixedLM.from_formula("y ~ x", groups=np.zeros(len(df)), data=df)


def test_one_level_is_fine_when_variance_components_carry_the_random_effects(df):
    # The crossed form: one group, random effects only as variance components.
    res = sm.MixedLM.from_formula("y ~ x", groups=np.ones(len(df)), vc_formula={"g": "0 + C(g)"}, data=df).fit()
    assert res.converged and np.isfinite(res.llf)


def test_unknown_missing_policy(df):
    y, X, g = _arrays(df)
    with pytest.raises(sm.InputError, match="missing='bogus'"):
        sm.MixedLM(y, X, g, missing="bogus")


def test_groups_is_required_in_from_formula(df):
    with pytest.raises(sm.InputError, match="'groups' is a required keyword"):
        sm.MixedLM.from_formula("y ~ x", data=df)


def test_penalties_are_rejected_not_ignored(df):
    model = sm.MixedLM.from_formula("y ~ x", groups="g", data=df)
    with pytest.raises(sm.InputError, match="fe_pen"):
        model.fit(fe_pen=object())


def test_meaningless_fit_keywords_warn_and_fit(df):
    model = sm.MixedLM.from_formula("y ~ x", groups="g", data=df)
    with pytest.warns(sm.IgnoredArgumentWarning, match="niter_sa, do_cg, full_output have no effect"):
        res = model.fit(niter_sa=3, do_cg=False, full_output=True)
    assert res.converged


def test_bad_start_params_length(df):
    model = sm.MixedLM.from_formula("y ~ x", groups="g", data=df)
    with pytest.raises(sm.InputError, match="start_params has length 5"):
        model.fit(start_params=np.ones(5))


def test_vcspec_with_wrong_row_count(df):
    y, X, g = _arrays(df)
    mats = [[np.ones((9, 1)) for _ in range(6)]]
    vcs = sm.VCSpec(["v"], [[["c"]] * 6], mats)
    with pytest.raises(sm.InputError, match=r"'v'.*9 rows but that group has 10"):
        sm.MixedLM(y, X, g, exog_vc=vcs)


@pytest.mark.parametrize("progress", [True, "yes", 1])
def test_progress_that_is_not_a_function(df, progress):
    with pytest.raises(sm.InputError, match=r"progress must be a function.*verbose=True"):
        sm.lmer("y ~ x + (1|g)", df, progress=progress)
    with pytest.raises(sm.InputError, match=r"progress must be a function"):
        sm.MixedLM(*_arrays(df)).fit(progress=progress)


def test_progress_function_is_called_with_evaluation_deviance_seconds(df):
    calls = []
    fit = sm.lmer("y ~ x + (1|g)", df, progress=lambda *a: calls.append(a))
    evaluations = [c[0] for c in calls]
    assert len(calls) >= 2 and evaluations[0] == 1 and np.all(np.diff(evaluations) > 0)
    assert evaluations[-1] <= fit.n_evaluations
    assert np.all(np.diff([c[1] for c in calls]) <= 0)  # reported when the deviance improves
    assert calls[-1][1] == pytest.approx(fit.deviance, abs=1e-6) and all(c[2] >= 0 for c in calls)
