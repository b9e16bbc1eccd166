"""Column dtypes every front door shares (issue 14): nullable booleans and numbers work; dates, periods,
durations, complex numbers, unsortable grouping labels and duplicate column names are InputErrors that name the
column, its dtype and the fix."""

import warnings

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix.errors import InputError


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def frame(n_groups=12, per=10, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per)
    n = g.size
    x = rng.normal(size=n)
    b = rng.random(n) > 0.5
    y = x + 0.5 * b + rng.normal(size=n_groups)[g] + rng.normal(size=n)
    d = pd.DataFrame({"y": y, "x": x, "g": g, "b": b})
    d["t"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 4, n), "D")
    return d


def lmer(formula, data, **kw):
    return sparsemix.lmer(formula, data, **kw)


def mixedlm(formula, data, groups="g", **kw):
    return sparsemix.MixedLM.from_formula(formula, data, groups=groups, **kw).fit()


def both_refuse(data, lmer_formula, sm_formula, *fragments, sm_kw=None, groups="g"):
    for fit in (lambda: lmer(lmer_formula, data), lambda: mixedlm(sm_formula, data, groups, **(sm_kw or {}))):
        with pytest.raises(InputError) as err:
            fit()
        for text in fragments:
            assert text in str(err.value)


# -- nullable pandas dtypes: fitted as their numpy counterparts, NA rows dropped as lme4's na.omit -------------


def test_nullable_boolean_fits_as_bool():
    d = frame()
    nb = d.assign(b=pd.array(d.b, dtype="boolean"))
    ref, got = lmer("y ~ x + b + (1|g)", d), lmer("y ~ x + b + (1|g)", nb)
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-10)
    assert list(got.fe_params.index) == list(ref.fe_params.index)
    np.testing.assert_allclose(got.theta, ref.theta, rtol=1e-8)
    sm_ref, sm_got = mixedlm("y ~ x + b", d), mixedlm("y ~ x + b", nb)
    np.testing.assert_allclose(np.asarray(sm_got.fe_params), np.asarray(sm_ref.fe_params), rtol=1e-8)


def test_nullable_boolean_with_na_drops_those_rows():
    d = frame()
    nb = d.assign(b=pd.array(d.b, dtype="boolean"))
    nb.loc[[3, 40, 77], "b"] = pd.NA
    ref = lmer("y ~ x + b + (1|g)", d.drop(index=[3, 40, 77]))
    got = lmer("y ~ x + b + (1|g)", nb)
    assert got.design.n_dropped == 3
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-10)
    sm_ref = mixedlm("y ~ x + b", d.drop(index=[3, 40, 77]))
    sm_got = mixedlm("y ~ x + b", nb, missing="drop")
    np.testing.assert_allclose(np.asarray(sm_got.fe_params), np.asarray(sm_ref.fe_params), rtol=1e-8)


def test_nullable_boolean_grouping_and_slope():
    d = frame()
    d["h"] = pd.array(np.arange(len(d)) % 2 == 0, dtype="boolean")
    ref = lmer("y ~ x + (h | g)", d.assign(h=d.h.astype(bool)))
    got = lmer("y ~ x + (h | g)", d)
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-8)


@pytest.mark.parametrize("dtype", ["Int64", "Float64"])
def test_nullable_numbers_with_na(dtype):
    d = frame()
    x = np.round(d.x * 10) if dtype == "Int64" else d.x
    nd = d.assign(x=pd.array(x.astype(int) if dtype == "Int64" else x, dtype=dtype))
    nd.loc[[5, 60], "x"] = pd.NA
    ref_data = d.assign(x=x.astype(float)).drop(index=[5, 60])
    got, ref = lmer("y ~ x + (1|g)", nd), lmer("y ~ x + (1|g)", ref_data)
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-10)
    sm_got, sm_ref = mixedlm("y ~ x", nd, missing="drop"), mixedlm("y ~ x", ref_data)
    np.testing.assert_allclose(np.asarray(sm_got.fe_params), np.asarray(sm_ref.fe_params), rtol=1e-8)


@pytest.mark.parametrize("dtype, na", [("Int64", False), ("Int64", True), ("UInt8", False), ("Float64", True)])
def test_nullable_numbers_as_factors(dtype, na):
    """Found by tests/test_fuzz.py: C(h) of a nullable Int64 column raised patsy's TypeError "Cannot interpret
    'Int64Dtype()' as a data type", through lmer and MixedLM's formulas (fixed part and vc_formula)."""
    d = frame()
    d["h"] = d.g % 4
    nd = d.assign(h=pd.array(d.h, dtype=dtype))
    ref_data = d.assign(h=d.h.astype(float) if dtype == "Float64" or na else d.h)
    if na:
        nd.loc[[4, 50], "h"] = pd.NA
        ref_data = ref_data.drop(index=[4, 50])
    got, ref = lmer("y ~ x + C(h) + (1|g)", nd), lmer("y ~ x + C(h) + (1|g)", ref_data)
    assert len(got.fe_params) == 5
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-10)
    pred = got.predict(nd)  # predict's newdata reads them the same way (NA rows predict NaN)
    assert pred.isna().sum() == (2 if na else 0)
    np.testing.assert_allclose(pred.dropna(), ref.predict(ref_data), rtol=1e-10)
    assert lmer("y ~ x + (1|g) + (1|g:h)", nd).nobs == len(ref_data)  # a grouping too
    sm_kw = {"missing": "drop"} if na else {}
    sm_got = mixedlm("y ~ x + C(h)", nd, **sm_kw)
    sm_ref = mixedlm("y ~ x + C(h)", ref_data)
    np.testing.assert_allclose(np.asarray(sm_got.fe_params), np.asarray(sm_ref.fe_params), rtol=1e-8)
    vc = mixedlm("y ~ x", nd, vc_formula={"h": "0 + C(h)"}, **sm_kw)
    assert np.isfinite(vc.llf)


@pytest.mark.parametrize(
    "convert",
    [
        lambda d: d.assign(s=pd.array(d.s, dtype=pd.ArrowDtype(__import__("pyarrow").string()))),
        lambda d: d.convert_dtypes(dtype_backend="pyarrow"),  # every column Arrow-backed
        lambda d: d.assign(x=pd.array(d.x, dtype="float64[pyarrow]"), h=pd.array(d.h, dtype="int64[pyarrow]")),
        lambda d: d.assign(b=pd.array(d.b, dtype="bool[pyarrow]")),
    ],
)
def test_arrow_backed_columns_fit_and_predict_as_numpy_ones(convert):
    """Found by tests/test_fuzz.py: patsy's TypeError "Cannot interpret 'string[pyarrow]' as a data type" for
    Arrow-backed text (a response, a factor) in the fit and in predict's newdata."""
    pytest.importorskip("pyarrow")
    d = frame()
    d["s"] = np.array(["lo", "mid", "hi"])[np.arange(len(d)) % 3]
    d["h"] = d.g % 3
    arrow = convert(d)
    f = "y ~ x + s + b + C(h) + (1|g)"
    ref, got = lmer(f, d), lmer(f, arrow)
    assert list(got.fe_params.index) == list(ref.fe_params.index)
    np.testing.assert_allclose(np.asarray(got.fe_params), np.asarray(ref.fe_params), rtol=1e-10)
    np.testing.assert_allclose(got.predict(arrow.iloc[:20]), ref.predict(d.iloc[:20]), rtol=1e-10)
    sm_ref, sm_got = mixedlm("y ~ x + s + b", d), mixedlm("y ~ x + s + b", arrow)
    np.testing.assert_allclose(np.asarray(sm_got.fe_params), np.asarray(sm_ref.fe_params), rtol=1e-8)
    np.testing.assert_allclose(sm_got.predict(arrow.iloc[:20]), sm_ref.predict(d.iloc[:20]), rtol=1e-8)


def test_arrow_backed_text_response_is_refused_as_text():
    pytest.importorskip("pyarrow")
    d = frame()
    d["s"] = pd.array(np.array(["lo", "hi"])[np.arange(len(d)) % 2], dtype="string[pyarrow]")
    with pytest.raises(InputError):
        lmer("s ~ x + (1|g)", d)
    with pytest.raises(InputError):
        mixedlm("s ~ x", d)


# -- dates: a covariate is an error naming the conversion; a grouping factor or C(date) is allowed ----------


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
def test_datetime_covariate_is_refused(tz):
    d = frame()
    d["t"] = d.t.dt.tz_localize(tz) if tz else d.t
    both_refuse(d, "y ~ t + (1|g)", "y ~ t", "'t'", "datetime64", "days since", "C(t)")
    both_refuse(d, "y ~ x + t:x + (1|g)", "y ~ x + t:x", "'t'", "datetime64")
    with pytest.raises(InputError, match="'t'.*datetime64.*days since"):
        lmer("y ~ x + (t | g)", d)
    with pytest.raises(InputError, match="'t'.*datetime64.*days since"):
        mixedlm("y ~ x", d, re_formula="~t")
    with pytest.raises(InputError, match="'t'.*datetime64"):
        lmer("y ~ C(t) + t + (1|g)", d)


@pytest.mark.parametrize("tz", [None, "UTC"])
def test_datetime_as_factor_or_grouping_is_allowed(tz):
    d = frame()
    d["t"] = d.t.dt.tz_localize(tz) if tz else d.t
    d["day"] = d.t
    m = lmer("y ~ C(t) + (1|g)", d)
    assert len(m.fe_params) == 4  # intercept and three of the four dates
    for form in ("factor(t)", "as.factor(t)"):  # R's names for C: the same explicit factor, the same fit
        other = lmer(f"y ~ {form} + (1|g)", d)
        assert len(other.fe_params) == 4 and other.llf == pytest.approx(m.llf, rel=1e-12)
    with pytest.raises(InputError, match="'t'.*datetime64"):  # (t also read as a number)
        lmer("y ~ factor(t) + t + (1|g)", d)
    assert len(lmer("y ~ x + (1 | day)", d).fe_params) == 2
    assert len(mixedlm("y ~ x", d, groups="day").fe_params) == 2
    assert len(mixedlm("y ~ x", d, vc_formula={"t": "0 + C(t)"}).fe_params) == 2


def test_datetime_weights_are_refused():
    d = frame()
    with pytest.raises(InputError, match="'w'.*datetime64"):
        lmer("y ~ x + (1|g)", d.assign(w=d.t), weights="w")


# -- periods, durations, complex numbers -----------------------------------------------------------------------


def test_period_covariate_is_refused_grouping_allowed():
    d = frame()
    d["p"] = d.t.dt.to_period("D")
    both_refuse(d, "y ~ p + (1|g)", "y ~ p", "'p'", "period[D]", "astype(str)")
    both_refuse(d, "y ~ x + (p|g)", "y ~ x", "'p'", "period[D]", sm_kw={"re_formula": "~p"})
    d["pg"] = pd.PeriodIndex([f"2020-{i % 12 + 1:02d}" for i in d.g], freq="M")
    ref = lmer("y ~ x + (1|g)", d)
    np.testing.assert_allclose(np.asarray(lmer("y ~ x + (1|pg)", d).fe_params), np.asarray(ref.fe_params), rtol=1e-8)
    np.testing.assert_allclose(
        np.asarray(mixedlm("y ~ x", d, groups="pg").fe_params), np.asarray(mixedlm("y ~ x", d).fe_params), rtol=1e-8
    )
    assert len(lmer("y ~ C(p) + (1|g)", d).fe_params) == 4


def test_timedelta_is_refused_with_the_conversion():
    d = frame()
    d["dt"] = d.t - pd.Timestamp("2019-12-25")
    fix = "data['dt'].dt.total_seconds() / 86400"
    both_refuse(d, "y ~ dt + (1|g)", "y ~ dt", "'dt'", "timedelta64", fix)
    both_refuse(d, "y ~ x + (dt|g)", "y ~ x", "'dt'", "timedelta64", fix, sm_kw={"re_formula": "~dt"})
    both_refuse(d, "dt ~ x + (1|g)", "dt ~ x", "'dt'", "timedelta64", fix)


def test_complex_columns_are_refused():
    d = frame()
    for name, formula, sm in [
        ("c", "y ~ c + (1|g)", "y ~ c"),
        ("y", "y ~ x + (1|g)", "y ~ x"),
        ("c", "y ~ x + (c|g)", "y ~ x"),
    ]:
        data = d.assign(c=d.x + 1j) if name == "c" else d.assign(y=d.y + 0j)
        both_refuse(
            data,
            formula,
            sm,
            f"'{name}'",
            "complex128",
            "real",
            sm_kw={"re_formula": "~c"} if "(c|g)" in formula else None,
        )


# -- labels that cannot be sorted, duplicate names ------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [lambda i: (1, 2) if i % 2 else 1.5, lambda i: "a" if i % 3 else 7, lambda i: (i % 4,) if i % 2 else f"g{i % 5}"],
)
def test_unsortable_grouping_labels(labels):
    d = frame()
    d["o"] = [labels(i) for i in range(len(d))]
    d["o"] = d["o"].astype(object)
    both_refuse(d, "y ~ x + (1|o)", "y ~ x", "grouping factor 'o'", "dtype object", "astype(str)", groups="o")
    with pytest.raises(InputError, match="grouping factor 'o'"):
        lmer("y ~ x + (1|g:o)", d)


@pytest.mark.parametrize(
    "labels",
    [lambda i: (1, 2) if i % 2 else 1.5, lambda i: "a" if i % 3 else 7, lambda i: (i % 4,) if i % 2 else f"g{i % 5}"],
)
def test_unsortable_labels_of_a_factor(labels):
    """Found by tests/test_fuzz.py: vc_formula's C(o) of such labels raised pandas' "'<' not supported between
    'tuple' and 'float'" (or "object of type 'float' has no len()"); C(o) in lmer's fixed part is the same check."""
    d = frame()
    d["o"] = [labels(i) for i in range(len(d))]
    d["o"] = d["o"].astype(object)
    with pytest.raises(InputError, match="factor 'o' \\(dtype object\\) mixes label types.*astype\\(str\\)"):
        mixedlm("y ~ x", d, vc_formula={"o": "0 + C(o)"})
    with pytest.raises(InputError, match="factor 'o' \\(dtype object\\) mixes label types"):
        mixedlm("y ~ x", d, vc_formula={"o": "0 + C(o)"}, groups=np.ones(len(d)), missing="drop")
    with pytest.raises(InputError, match="factor 'o' \\(dtype object\\) mixes label types"):
        lmer("y ~ x + C(o) + (1|g)", d)


@pytest.mark.parametrize("dup", ["x", "g", "y"])
def test_duplicate_column_names_are_named(dup):
    d = frame()
    d = pd.concat([d, d[[dup]]], axis=1)
    both_refuse(d, "y ~ x + (1|g)", "y ~ x", f"'{dup}'", "more than one column", "Rename")


def test_duplicate_names_the_model_does_not_use_are_fine():
    d = frame()
    d = pd.concat([d, d[["t"]], d[["t"]]], axis=1)
    assert len(lmer("y ~ x + (1|g)", d).fe_params) == 2
    assert len(mixedlm("y ~ x", d).fe_params) == 2


# -- predict's newdata is read as the fit's data was -------------------------------------------------------------


def test_newdata_with_nullable_booleans_predicts_as_bool():
    """Before: a nullable boolean newdata column gave patsy's error, although the fit took the same dtype."""
    d = frame()
    nb = d.assign(b=pd.array(d.b, dtype="boolean"))
    ref, got = lmer("y ~ x + b + (b | g)", d), lmer("y ~ x + b + (b | g)", nb)
    new = nb.iloc[:30].copy()
    new.loc[new.index[[2, 5]], "b"] = pd.NA
    pred = got.predict(new)
    assert np.isnan(pred.iloc[[2, 5]]).all() and np.isfinite(pred.drop(index=new.index[[2, 5]])).all()
    np.testing.assert_allclose(
        pred.drop(index=new.index[[2, 5]]), ref.predict(d.iloc[:30]).drop(index=new.index[[2, 5]]), rtol=1e-7
    )
    np.testing.assert_allclose(got.predict(d.iloc[:30]), ref.predict(d.iloc[:30]), rtol=1e-7)  # plain bools too
    sm_ref, sm_got = (sparsemix.MixedLM.from_formula("y ~ x + b", data, groups="g").fit() for data in (d, nb))
    np.testing.assert_allclose(sm_got.predict(nb.iloc[:30]), sm_ref.predict(d.iloc[:30]), rtol=1e-7)


@pytest.mark.parametrize("kind", ["period", "tz-date"])
def test_newdata_with_periods_or_zoned_dates_as_grouping_matches_the_fitted_levels(kind):
    d = frame()
    d["pg"] = (
        pd.PeriodIndex([f"2020-{i % 12 + 1:02d}" for i in d.g], freq="M")
        if kind == "period"
        else pd.DatetimeIndex(pd.Timestamp("2020-01-01", tz="UTC") + pd.to_timedelta(d.g, "D"))
    )
    m = lmer("y ~ x + (1 | pg)", d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsemix.NewLevelWarning)  # every level must be found
        pred = m.predict(d.iloc[::7])
    np.testing.assert_allclose(pred, m.fitted.iloc[::7], rtol=1e-10)
