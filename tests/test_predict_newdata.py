"""predict's new-data path (issue 14) and pickling of fitted results.

Levels of a grouping factor match by value (308, 308.0 and "308" are one level), new levels warn with a row
count, NaN rows predict NaN, bad newdata or offsets are InputErrors naming the problem; results of every front
door pickle and give the same numbers after.
"""

import io
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import reference_data

import sparsemix as sm
from sparsemix.errors import InputError, NewLevelWarning
from sparsemix.formula.newdata import value_key

SLEEP = reference_data("sleepstudy")
SLEEP_INT = SLEEP.assign(Subject=SLEEP.Subject.astype(int))


@pytest.fixture(scope="module")
def fm_int():
    """Fitted with an integer Subject column."""
    return sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP_INT)


@pytest.fixture(scope="module")
def fm_text():
    """Fitted with a text Subject column."""
    return sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewLevelWarning)  # a match by value must not warn
        return fn(*args, **kwargs)


# -- levels match by value ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        lambda s: s.astype(float),  # what an NA in a CSV column makes
        lambda s: s.astype(str),
        lambda s: s.astype(np.int32),
        lambda s: s.astype("category"),
        lambda s: s.astype(float).astype(str),  # "308.0"
        lambda s: pd.Series([v if i % 2 else str(v) for i, v in enumerate(s)], dtype=object),  # 308 and "308"
    ],
)
def test_integer_levels_match_by_value(fm_int, subject):
    expected = fm_int.predict(SLEEP_INT)
    got = _quiet(fm_int.predict, SLEEP_INT.assign(Subject=subject(SLEEP_INT.Subject).to_numpy()))
    np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())


@pytest.mark.parametrize(
    "subject", [lambda s: s.astype(int), lambda s: s.astype(float), lambda s: s.astype(int).astype("Int64")]
)
def test_text_levels_match_numbers_by_value(fm_text, subject):
    got = _quiet(fm_text.predict, SLEEP.assign(Subject=subject(SLEEP.Subject)))
    np.testing.assert_array_equal(got.to_numpy(), fm_text.predict(SLEEP).to_numpy())


def test_float_fit_matches_integer_newdata():
    frame = SLEEP_INT.assign(Subject=SLEEP_INT.Subject.astype(float))
    fit = sm.lmer("Reaction ~ Days + (1 | Subject)", frame)
    got = _quiet(fit.predict, SLEEP_INT)
    np.testing.assert_array_equal(got.to_numpy(), fit.predict(frame).to_numpy())


def test_interaction_levels_match_by_value():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"a": np.repeat(np.arange(6), 20), "b": np.tile(np.arange(4), 30), "x": rng.normal(size=120)})
    frame["y"] = (
        frame.x + rng.normal(size=6)[frame.a] + rng.normal(size=24)[frame.a * 4 + frame.b] + rng.normal(size=120)
    )
    fit = sm.lmer("y ~ x + (1 | a) + (1 | a:b)", frame)
    other = frame.assign(a=frame.a.astype(float), b=frame.b.astype(str))
    np.testing.assert_array_equal(_quiet(fit.predict, other).to_numpy(), fit.predict(frame).to_numpy())


def test_a_csv_column_with_an_na_reads_as_float_and_still_matches(fm_int):
    text = SLEEP_INT.iloc[:12].to_csv(index=False).splitlines()
    header, rows = text[0], text[1:]
    cells = rows[4].split(",")
    cells[header.split(",").index("Subject")] = ""  # one missing Subject: the column is float
    rows[4] = ",".join(cells)
    frame = pd.read_csv(io.StringIO("\n".join([header] + rows)))
    assert frame.Subject.dtype == float
    got = _quiet(fm_int.predict, frame)
    expected = fm_int.predict(SLEEP_INT.iloc[:12]).to_numpy()
    assert np.isnan(got.iloc[4])
    np.testing.assert_array_equal(np.delete(got.to_numpy(), 4), np.delete(expected, 4))


@pytest.mark.parametrize(
    "label, key",
    [
        ("308", "308"),
        ("308.0", "308"),
        ("0308", "308"),
        ("+308", "308"),
        ("0.50", "0.5"),
        ("3e2", "300"),
        ("a", "a"),
        ("A", "A"),
        ("1.5:02", "1.5:2"),
        ("9007199254740993", "9007199254740993"),
        ("-0", "0"),
        ("nan", "nan"),
    ],
)
def test_value_key(label, key):
    assert value_key(label) == key


def test_a_label_matching_two_fitted_levels_by_value_is_an_error():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"g": np.repeat(["1", "01", "2", "3"], 10), "x": rng.normal(size=40)})
    frame["y"] = frame.x + rng.normal(size=40)
    fit = sm.lmer("y ~ x + (1 | g)", frame)
    with pytest.raises(InputError, match=r"'001' of 'g' matches the fitted levels .*'01'.*'1'"):
        fit.predict(pd.DataFrame({"x": [0.0], "g": ["001"]}))
    # the exact label wins over a match by value
    np.testing.assert_array_equal(_quiet(fit.predict, frame.iloc[:20]), fit.predict().iloc[:20])


# -- new levels: population level, with a warning that counts them ------------------------------------------


@pytest.mark.parametrize("n_new", [1, 5, 180])
def test_new_levels_warn_with_their_row_count(fm_int, n_new):
    frame = SLEEP_INT.copy()
    frame.loc[frame.index[:n_new], "Subject"] = 9999
    with pytest.warns(NewLevelWarning, match=rf"^{n_new} of 180 row\(s\) of newdata have levels of 'Subject'.*9999"):
        got = fm_int.predict(frame)
    population = fm_int.predict(frame, include_random=False)
    np.testing.assert_allclose(got.iloc[:n_new], population.iloc[:n_new], rtol=1e-14)
    np.testing.assert_array_equal(got.iloc[n_new:], fm_int.predict(SLEEP_INT).iloc[n_new:])
    with pytest.raises(InputError, match=rf"{n_new} of 180 row\(s\) with levels of 'Subject' not in the fitted"):
        fm_int.predict(frame, allow_new_levels=False)


def test_no_warning_without_random_effects(fm_int):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm_int.predict(SLEEP_INT.assign(Subject=-1), include_random=False)


# -- offsets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 179, 181])
def test_offset_of_the_wrong_length_is_an_error(fm_int, n):
    with pytest.raises(InputError, match=rf"offset has {n} value\(s\) but newdata has 180 row\(s\)"):
        fm_int.predict(SLEEP_INT, offset=np.ones(n))


def test_offset_by_values_and_by_column(fm_int):
    base = fm_int.predict(SLEEP_INT)
    off = np.linspace(-1, 1, 180)
    np.testing.assert_allclose(fm_int.predict(SLEEP_INT, offset=off), base + off, rtol=1e-14)
    np.testing.assert_allclose(fm_int.predict(SLEEP_INT.assign(o=off), offset="o"), base + off, rtol=1e-14)
    with_nan = off.copy()
    with_nan[7] = np.nan
    got = fm_int.predict(SLEEP_INT, offset=with_nan)
    assert np.isnan(got.iloc[7]) and np.isfinite(np.delete(got.to_numpy(), 7)).all()


@pytest.mark.parametrize(
    "offset, message",
    [
        ("nope", r"offset='nope' is not a column of newdata"),
        (np.ones((180, 2)), r"offset must be one-dimensional"),
        (["a"] * 180, r"offset must be numeric"),
    ],
)
def test_bad_offsets_are_errors(fm_int, offset, message):
    with pytest.raises(InputError, match=message):
        fm_int.predict(SLEEP_INT, offset=offset)


# -- newdata itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("newdata", [SLEEP_INT.to_dict("list"), [1.0, 2.0], np.ones((3, 2)), "Days"])
def test_newdata_must_be_a_frame(fm_int, newdata):
    with pytest.raises(InputError, match=rf"newdata must be a pandas DataFrame.*got a {type(newdata).__name__}"):
        fm_int.predict(newdata)


@pytest.mark.parametrize(
    "drop, named",
    [
        (["Days"], r"'Days' \(fixed effects; random-effects term"),
        (["Subject"], r"'Subject' \(random-effects term \(Days \| Subject\)\)"),
        (["Days", "Subject"], r"'Days' .*'Subject'"),
    ],
)
def test_missing_columns_are_named(fm_int, drop, named):
    with pytest.raises(InputError, match=rf"newdata has no column {named}"):
        fm_int.predict(SLEEP_INT.drop(columns=drop))


def test_grouping_column_not_needed_without_random_effects(fm_int):
    got = fm_int.predict(SLEEP_INT.drop(columns="Subject"), include_random=False)
    np.testing.assert_allclose(got, fm_int.fe_params["(Intercept)"] + fm_int.fe_params["Days"] * SLEEP_INT.Days)


@pytest.mark.parametrize("column, rows", [("Days", [3]), ("Days", [0, 50, 179]), ("Subject", [10, 11])])
def test_rows_with_missing_values_predict_nan(fm_int, column, rows):
    frame = SLEEP_INT.astype({column: float})
    frame.loc[rows, column] = np.nan
    got = fm_int.predict(frame)
    expected = fm_int.predict(SLEEP_INT).to_numpy()
    assert got.index.equals(frame.index)
    assert np.isnan(got.iloc[rows]).all()
    np.testing.assert_array_equal(np.delete(got.to_numpy(), rows), np.delete(expected, rows))


def test_the_fit_frame_with_missing_rows():
    frame = SLEEP_INT.astype({"Days": float})
    frame.loc[[2, 40], "Reaction"] = np.nan  # the response: not needed to predict
    frame.loc[[7], "Days"] = np.nan
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", frame)
    got = fit.predict(frame)
    assert len(got) == 180 and np.isnan(got.iloc[7]) and np.isnan(got).sum() == 1
    np.testing.assert_allclose(got.drop(index=[2, 7, 40]), fit.fitted, rtol=1e-12)  # rows fitted


def test_a_transform_of_a_bad_value_predicts_nan():
    fit = sm.lmer("Reaction ~ log(Days + 1) + (1 | Subject)", SLEEP_INT)
    frame = SLEEP_INT.astype({"Days": float}).iloc[:4].copy()
    frame.loc[1, "Days"] = -3.0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "invalid value encountered in log"
        got = fit.predict(frame)
    assert np.isnan(got.iloc[1]) and np.isfinite(got.drop(index=1)).all()


@pytest.mark.parametrize("formula", ["Reaction ~ Days + f + (1 | Subject)", "Reaction ~ Days + C(f) + (1 | Subject)"])
@pytest.mark.parametrize("new_f, shown", [(["c"], "'c'"), (["a", "zz", "yy"], "'zz', 'yy'")])
def test_unseen_level_of_a_fixed_factor_is_an_error(formula, new_f, shown):
    frame = SLEEP_INT.assign(f=np.where(SLEEP_INT.Days % 2 == 0, "a", "b"))
    fit = sm.lmer(formula, frame)
    new = pd.DataFrame({"Days": [1.0] * len(new_f), "Subject": [308] * len(new_f), "f": new_f})
    with pytest.raises(
        InputError,
        match=rf"column 'f' has level\(s\) the fit did not see: {shown}.*"
        r"fitted levels: 'a', 'b'",
    ):
        fit.predict(new)


# -- MixedLM (statsmodels' door) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def md():
    frame = SLEEP_INT.assign(f=np.where(SLEEP_INT.Days % 2 == 0, "a", "b"))
    return sm.MixedLM.from_formula("Reaction ~ Days + f", frame, groups="Subject", re_formula="~Days").fit(), frame


def test_mixedlm_predict_newdata(md):
    res, frame = md
    expected = res.predict(frame)
    np.testing.assert_array_equal(res.predict(frame.to_dict("list")), expected)  # statsmodels takes a dict
    nan = frame.astype({"Days": float})
    nan.loc[[5, 6], "Days"] = np.nan
    got = res.predict(nan)
    assert np.isnan(got.iloc[[5, 6]]).all()
    np.testing.assert_array_equal(got.drop(index=[5, 6]), expected.drop(index=[5, 6]))
    with pytest.raises(InputError, match=r"newdata has no column 'Days' \(fixed effects\)"):
        res.predict(frame.drop(columns="Days"))
    with pytest.raises(InputError, match=r"column 'f' has level\(s\) the fit did not see: 'q'"):
        res.predict(frame.assign(f="q"))
    with pytest.raises(InputError, match="a dict as newdata must map column names to columns of one length"):
        res.predict({"Days": [1, 2], "f": ["a"]})


# -- pickling -----------------------------------------------------------------------------------------------------


def double(x):
    """A caller's function a formula uses: pickled by reference."""
    return 2 * x


PROTOCOLS = [None, 2, pickle.HIGHEST_PROTOCOL]


def _roundtrip(obj, protocol):
    return pickle.loads(pickle.dumps(obj) if protocol is None else pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "formula",
    [
        "Reaction ~ Days + (Days | Subject)",
        "Reaction ~ center(Days) + f + double(Days) + (1 | Subject) + (0 + f | Subject)",
        "Reaction ~ poly(Days, 2) + (1 | Subject) + (1 | f)",
    ],
)
def test_lmer_results_pickle(protocol, formula):
    frame = SLEEP_INT.assign(f=np.where(SLEEP_INT.Days % 3 == 0, "a", "b"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.lmer(formula, frame)
    back = _roundtrip(fit, protocol)
    assert "_factor" not in back.fit_result.system.__dict__  # dropped; rebuilt on first use
    new = frame.iloc[::7].assign(Subject=frame.Subject.iloc[::7].astype(float))
    np.testing.assert_array_equal(back.predict(new), fit.predict(new))
    np.testing.assert_array_equal(back.predict(), fit.predict())
    assert str(back.summary()) == str(fit.summary())
    for name, frame_re in fit.ranef().items():
        pd.testing.assert_frame_equal(back.ranef()[name], frame_re, check_exact=True)
    pd.testing.assert_frame_equal(back.confint("wald"), fit.confint("wald"), check_exact=True)
    assert back.llf == fit.llf


def test_lmer_results_pickle_before_and_after_a_prediction(fm_int):
    fm_int.predict(SLEEP_INT.assign(Subject=SLEEP_INT.Subject.astype(float)))  # caches level matchers
    back = _roundtrip(_roundtrip(fm_int, None), 2)
    np.testing.assert_array_equal(
        back.predict(SLEEP_INT.assign(Subject=SLEEP_INT.Subject.astype(str))), fm_int.predict(SLEEP_INT)
    )


def test_a_formula_function_that_cannot_be_pickled_is_named():
    local = lambda x: x + 1  # noqa: F841 (the formula calls it from this frame)
    fit = sm.lmer("Reaction ~ local(Days) + (1 | Subject)", SLEEP_INT)
    with pytest.raises(pickle.PicklingError, match="defined at the top level of a module"):
        pickle.dumps(fit)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mixedlm_formula_results_pickle(md, protocol):
    res, frame = md
    back = _roundtrip(res, protocol)
    np.testing.assert_array_equal(back.predict(frame), res.predict(frame))
    np.testing.assert_array_equal(back.fittedvalues, res.fittedvalues)
    np.testing.assert_array_equal(back.bse, res.bse)
    assert str(back.summary()) == str(res.summary())
    for key, value in res.random_effects.items():
        pd.testing.assert_series_equal(back.random_effects[key], value, check_exact=True)
    pd.testing.assert_frame_equal(back.random_effects_cov[308], res.random_effects_cov[308], check_exact=True)
    model = _roundtrip(res.model, protocol)  # the model alone, refitted after
    np.testing.assert_allclose(model.fit().params, res.params, rtol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mixedlm_array_results_pickle(protocol):
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(15), 8)
    x = rng.normal(size=120)
    y = 1 + x + rng.normal(size=15)[g] + rng.normal(size=15)[g] * x + rng.normal(size=120)
    exog = np.column_stack([np.ones(120), x])
    res = sm.MixedLM(y, exog, groups=g, exog_re=exog).fit()
    back = _roundtrip(res, protocol)
    np.testing.assert_array_equal(back.predict(exog[:9]), res.predict(exog[:9]))
    np.testing.assert_array_equal(back.fittedvalues, res.fittedvalues)
    np.testing.assert_array_equal(back.bse, res.bse)
    np.testing.assert_array_equal(back.conf_int(), res.conf_int())
    assert str(back.summary()) == str(res.summary())
    res.remove_data()
    assert str(_roundtrip(res, protocol).summary()) == str(res.summary())


def test_dask_results_pickle():
    dd = pytest.importorskip("dask.dataframe")
    fit = sm.lmer("Reaction ~ Days + (Days | Subject)", dd.from_pandas(SLEEP_INT, npartitions=3))
    back = _roundtrip(fit, None)
    np.testing.assert_array_equal(back.predict(SLEEP_INT), fit.predict(SLEEP_INT))
    as_float = SLEEP_INT.assign(Subject=SLEEP_INT.Subject.astype(float))  # levels match by value here too
    np.testing.assert_array_equal(fit.predict(as_float), fit.predict(SLEEP_INT))
    # (by partition: BLAS's products over other lengths may round the last bit differently)
    np.testing.assert_allclose(
        fit.predict(dd.from_pandas(as_float, npartitions=2)).compute(), fit.predict(SLEEP_INT), rtol=1e-13
    )
    assert str(back.summary()) == str(fit.summary())


def plus_square(v):
    """A function of the test's module that formulas call (top level: the fit pickles with it)."""
    return v + v**2


def test_a_callers_variable_does_not_stand_in_for_a_missing_column():
    """Before: with a variable `x` in the caller's namespace, predict(newdata without x) read that variable
    (patsy looks in the formula's environment) and returned numbers; the fit itself refuses such values."""
    rng = np.random.default_rng(5)
    n = 120
    data = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "g": rng.integers(0, 10, n)})
    x = np.zeros(n)  # noqa: F841 (the caller's variable the formula must not read)
    fits = [
        sm.lmer("y ~ x + plus_square(x) + np.log(x + 5) + (np.log(x + 5) | g)", data),
        sm.MixedLM.from_formula("y ~ x + plus_square(x)", data, groups="g").fit(),
    ]
    for fit in fits:
        with pytest.raises(InputError, match="newdata has no column 'x'"):
            fit.predict(data.drop(columns="x"))
        restored = pickle.loads(pickle.dumps(fit))
        np.testing.assert_allclose(np.asarray(restored.predict(data)), np.asarray(fit.predict(data)), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(fits[0].predict(data)), np.asarray(fits[0].fitted), rtol=1e-10)


@pytest.mark.parametrize(
    "values",
    [
        lambda days: days.astype(str) + " days",
        lambda days: pd.Timestamp("2020-01-01") + pd.to_timedelta(days, "D"),
        lambda days: pd.to_timedelta(days, "D"),
        lambda days: days + 0j,
        lambda days: pd.Categorical(days),
        # booleans are no numbers to patsy, whose error message then raised AttributeError (the long fuzz run)
        lambda days: days > 4,
        lambda days: pd.array(days > 4, dtype="boolean"),
    ],
)
def test_newdata_with_other_values_where_the_fit_read_numbers(fm_int, values):
    """Before: text, dates, durations or complex numbers in newdata's covariate reached patsy's AttributeError
    or numpy's UFuncTypeError (found by the fuzz test)."""
    new = SLEEP_INT.iloc[:20].assign(Days=values(SLEEP_INT.Days.iloc[:20]))
    with pytest.raises(InputError, match="newdata's column 'Days' holds .* values, where the fit read numbers"):
        fm_int.predict(new)


def test_a_column_aliased_with_itself_is_dropped_from_predictions_too():
    """Before: lmer('y ~ x + `x` + (1|g)') dropped the aliased copy from the fit, but predict kept it by its lme4
    name (x for both) and multiplied one column too many: a ValueError from matmul (found by the fuzz test)."""
    rng = np.random.default_rng(3)
    data = pd.DataFrame({"y": rng.normal(size=60), "x": rng.normal(size=60), "g": rng.integers(0, 6, 60)})
    with pytest.warns(sm.RankDeficiencyWarning, match="dropping 1 column"):
        fit = sm.lmer("y ~ x + `x` + (1 | g)", data)
    np.testing.assert_allclose(fit.predict(data), fit.fitted, rtol=1e-12)
    reference = sm.lmer("y ~ x + (1 | g)", data)
    np.testing.assert_allclose(fit.predict(data.iloc[:7]), reference.predict(data.iloc[:7]), rtol=1e-9)


@pytest.mark.parametrize("door", ["lmer", "MixedLM"])
def test_newdata_numbers_against_boolean_levels_and_repeated_columns_are_input_errors(door):
    """Found by the long fuzz run: a fit whose fixed factor is boolean, and newdata with numbers there (pandas'
    isin raised TypeError 'No matching signature found') or with the column twice (AttributeError on a frame's
    dtype)."""
    x = [False, False, False, True, True, False]
    data = pd.DataFrame({"y": [0.13, -0.13, 0.64, 0.10, 0.30, 0.20], "x": x, "g": [1, 1, 2, 2, 3, 3]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = (
            sm.lmer("y ~ x + (1 | g)", data)
            if door == "lmer"
            else sm.MixedLM.from_formula("y ~ x", data, groups="g").fit()
        )
    with pytest.raises(InputError, match=r"level\(s\) the fit did not see: '-132.125' \(1 row\(s\)\)"):
        fit.predict(pd.DataFrame({"y": [0.1], "x": [-132.125], "g": [1]}))
    with pytest.raises(InputError, match="more than one column named 'x'"):
        fit.predict(pd.DataFrame([[0.1, True, False, 1]], columns=["y", "x", "x", "g"]))
