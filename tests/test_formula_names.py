"""Names in formulas: columns named by Python keywords and builtins, written bare in every front door, and the
functions of the calling code (as patsy's eval_env), with Python's builtins, dunders and attributes refused."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import reference_data

import sparsemix
from sparsemix import FormulaError
from sparsemix.cli import main

LMER = "{y} ~ {x} * {f} + log({z}) + I({x}^2) + (1 + {x} | {g}) + (1 | {g}:{h})"
PLAIN = dict(y="resp", x="dose", f="kind", z="size", g="site", h="plot")
# Keywords (bare they are syntax to Python, or a constant: True, None) and builtins, in every role.
RENAMINGS = [
    dict(y="yield", x="class", f="in", z="lambda", g="from", h="if"),
    dict(y="sum", x="True", f="None", z="type", g="if", h="lambda"),
    dict(y="None", x="sum", f="type", z="True", g="class", h="yield"),
]


def _frame(n=300, seed=3):
    rng = np.random.default_rng(seed)
    g, h = rng.integers(0, 15, n), rng.integers(0, 4, n)
    x, f = rng.normal(size=n), np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    z = rng.uniform(1, 3, n)
    y = (
        10
        + x
        + (f == "b")
        + rng.normal(size=15)[g]
        + 0.3 * x * rng.normal(size=15)[g]
        + 0.8 * rng.normal(size=(15, 4))[g, h]
        + 0.5 * z * rng.normal(size=15)[g]
        + rng.normal(size=n)
    )
    return pd.DataFrame({"resp": y, "dose": x, "kind": f, "size": z, "site": g.astype(str), "plot": h})


@pytest.fixture(scope="module")
def frame():
    return _frame()


def _renamed(frame, names):
    return frame.rename(columns={PLAIN[k]: v for k, v in names.items()})


def _rename_terms(label, names):
    """A coefficient name of the plain fit with the columns renamed."""
    new = {PLAIN[k]: v for k, v in names.items()}
    return re.sub(r"\b(" + "|".join(new) + r")\b", lambda m: new[m.group(0)], label)


@pytest.fixture(scope="module")
def data(frame):
    """The same data with one-letter names, for the tests of functions."""
    return frame.rename(columns={v: k for k, v in PLAIN.items()})


@pytest.fixture(scope="module")
def plain_fit(frame):
    return sparsemix.lmer(LMER.format(**PLAIN), frame)


@pytest.mark.parametrize("names", RENAMINGS)
def test_lmer_reads_keyword_and_builtin_columns_bare(frame, plain_fit, names):
    fit = sparsemix.lmer(LMER.format(**names), _renamed(frame, names))
    assert fit.llf == plain_fit.llf
    np.testing.assert_array_equal(fit.fe_params.to_numpy(), plain_fit.fe_params.to_numpy())
    np.testing.assert_array_equal(fit.theta, plain_fit.theta)
    assert list(fit.fe_params.index) == [_rename_terms(c, names) for c in plain_fit.fe_params.index]
    vc = fit.variance_components()
    assert list(vc.grp) == [_rename_terms(c, names) for c in plain_fit.variance_components().grp]
    new = _renamed(frame.iloc[:5], names)
    np.testing.assert_array_equal(fit.predict(new), plain_fit.predict(frame.iloc[:5]))


def test_backticks_give_the_names_r_gives(frame, plain_fit):
    names = RENAMINGS[0]
    quoted = {k: f"`{v}`" for k, v in names.items()}
    fit = sparsemix.lmer(LMER.format(**quoted), _renamed(frame, names))
    assert fit.llf == plain_fit.llf
    # R writes `yield`, `class`, `lambda` bare and reserved words (in, if) in backticks, as lme4 1.1-31 names
    # `if` and `yield` in coefficient names.
    # (in R's order: main effects as written, then the interaction; patsy puts factor-only terms first)
    assert list(fit.fe_params.index) == [
        "(Intercept)",
        "class",
        "`in`[T.b]",
        "`in`[T.c]",
        "log(lambda)",
        "I(class^2)",
        "class:`in`[T.b]",
        "class:`in`[T.c]",
    ]


def test_from_formula_reads_keyword_columns_in_every_formula(frame):
    kw = dict(re_formula="~{x}", vc_formula={"v": "0 + C({h})", "w": "0 + {z}"}, groups="{g}")

    def fit(names, data):
        args = {
            k: v.format(**names) if isinstance(v, str) else {n: f.format(**names) for n, f in v.items()}
            for k, v in kw.items()
        }
        return sparsemix.MixedLM.from_formula("{y} ~ {x} * {f} + log({z})".format(**names), data, **args).fit()

    plain = fit(PLAIN, frame)
    for names in RENAMINGS:
        result = fit(names, _renamed(frame, names))
        assert result.llf == plain.llf
        np.testing.assert_array_equal(result.params.to_numpy(), plain.params.to_numpy())
        assert list(result.params.index) == [_rename_terms(c, names) for c in plain.params.index]


def test_a_column_wins_over_a_function_of_the_same_name(data, plain_fit):
    def x(v):  # noqa: F811 - the caller's function must not replace the column x
        return 100 * v

    fit = sparsemix.lmer("y ~ x * f + log(z) + I(x^2) + (1 + x | g) + (1 | g:h)", data)
    assert fit.llf == plain_fit.llf and x(1) == 100
    d = data.rename(columns={"z": "log"})  # a column called log: the column; np.log the function
    fit = sparsemix.lmer("y ~ x * f + np.log(log) + I(x^2) + (1 + x | g) + (1 | g:h)", d)
    assert fit.llf == plain_fit.llf
    with pytest.raises(FormulaError, match="calls the column 'log' as a function"):
        sparsemix.lmer("y ~ log(log) + (1 | g)", d)


def test_the_command_line_reads_keyword_columns(capsys, frame, plain_fit, tmp_path):
    names = RENAMINGS[0]
    path = tmp_path / "oats.csv"
    _renamed(frame, names).to_csv(path, index=False)
    code = main(["fit", str(path), "--formula", LMER.format(**names), "--format", "json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    assert record["llf"] == pytest.approx(plain_fit.llf, rel=1e-10)
    assert [r["name"] for r in record["fixed_effects"]] == [_rename_terms(c, names) for c in plain_fit.fe_params.index]
    # (through the CSV's decimal text, which is not always the same double)
    np.testing.assert_allclose([r["estimate"] for r in record["fixed_effects"]], plain_fit.fe_params, rtol=1e-9)


def test_dask_reads_keyword_columns(frame, plain_fit):
    dd = pytest.importorskip("dask.dataframe")
    names = RENAMINGS[0]  # `in` is a text column: its levels are gathered across partitions
    fit = sparsemix.lmer(LMER.format(**names), dd.from_pandas(_renamed(frame, names), npartitions=3))
    assert fit.llf == pytest.approx(plain_fit.llf, rel=1e-9)
    np.testing.assert_allclose(fit.fe_params.to_numpy(), plain_fit.fe_params.to_numpy(), rtol=1e-7)
    assert list(fit.fe_params.index) == [_rename_terms(c, names) for c in plain_fit.fe_params.index]


def test_a_keyword_that_is_not_a_column_says_so(data):
    with pytest.raises(FormulaError, match="'class' is a Python keyword and not a column of the data"):
        sparsemix.lmer("y ~ class + (1 | g)", data)
    with pytest.raises(FormulaError, match="'yield' is a Python keyword"):
        sparsemix.MixedLM.from_formula("yield ~ x", data, groups="g")


# -- the functions of the calling code ----------------------------------------------------------------


def shifted(v):
    return v - 2.0


def test_lmer_and_from_formula_call_the_callers_functions(data):
    def times_two(v):
        return 2 * v

    # ML: the REML criterion depends on the scale of X's columns, the likelihood does not.
    plain = sparsemix.lmer("y ~ x + (1 + x | g)", data, reml=False)
    fit = sparsemix.lmer("y ~ times_two(x) + (1 + times_two(x) | g)", data, reml=False)
    assert fit.llf == pytest.approx(plain.llf, rel=1e-9)
    assert fit.fe_params["times_two(x)"] == pytest.approx(plain.fe_params["x"] / 2, rel=1e-6)
    fit = sparsemix.lmer("y ~ shifted(x) + (1 | g)", data, reml=False)  # a module-level function
    assert fit.fe_params["shifted(x)"] == pytest.approx(
        sparsemix.lmer("y ~ x + (1 | g)", data, reml=False).fe_params["x"], rel=1e-9
    )

    # statsmodels' test_formulas: the function in the fixed part and in re_formula.
    model = sparsemix.MixedLM.from_formula("y ~ times_two(x)", data, groups="g", re_formula="~times_two(x)")
    doubled = sparsemix.MixedLM.from_formula("y ~ x2", data.assign(x2=2 * data.x), groups="g", re_formula="~x2")
    result, reference = model.fit(), doubled.fit()
    assert result.llf == pytest.approx(reference.llf, rel=1e-10)
    np.testing.assert_allclose(result.params.to_numpy(), reference.params.to_numpy(), rtol=1e-6)
    assert list(result.params.index)[:2] == ["Intercept", "times_two(x)"]
    vc = sparsemix.MixedLM.from_formula("y ~ x", data, groups="g", vc_formula={"t": "0 + times_two(x)"}).fit()
    ref = sparsemix.MixedLM.from_formula(
        "y ~ x", data.assign(x2=2 * data.x), groups="g", vc_formula={"t": "0 + x2"}
    ).fit()
    assert vc.llf == pytest.approx(ref.llf, rel=1e-10)


def _fit_through(formula, data, depth):
    return sparsemix.lmer(formula, data, eval_env=depth, reml=False)


def test_eval_env_chooses_the_namespace(data):
    def halved(v):
        return v / 2

    plain = sparsemix.lmer("y ~ x + (1 | g)", data, reml=False)
    assert _fit_through("y ~ halved(x) + (1 | g)", data, 1).llf == pytest.approx(plain.llf, rel=1e-9)
    with pytest.raises(FormulaError, match="'halved', which is not a column"):
        _fit_through("y ~ halved(x) + (1 | g)", data, 0)  # the wrapper's frame has no halved
    for empty in ({}, -1):
        with pytest.raises(FormulaError, match="'halved', which is not a column"):
            sparsemix.lmer("y ~ halved(x) + (1 | g)", data, eval_env=empty)
        with pytest.raises(FormulaError, match="'halved', which is not a column"):
            sparsemix.MixedLM.from_formula("y ~ halved(x)", data, groups="g", eval_env=empty)
    fit = sparsemix.lmer("y ~ twice(x) + (1 | g)", data, eval_env={"twice": lambda v: 2 * v}, reml=False)
    assert fit.llf == pytest.approx(plain.llf, rel=1e-9)
    with pytest.raises(FormulaError, match="not a frame depth"):
        sparsemix.lmer("y ~ x + (1 | g)", data, eval_env=-2)


def test_the_formulas_own_names_are_not_the_callers(data, plain_fit):
    np = SimpleNamespace(log=lambda v: 0 * v)  # noqa: F841 - np.log in a formula is numpy's log
    Q = None  # noqa: F841 - Q (and backticks) stay patsy's
    fit = sparsemix.lmer("y ~ x * f + np.log(`z`) + I(x^2) + (1 + x | g) + (1 | g:h)", data)
    assert fit.llf == plain_fit.llf
    C = 0.5  # noqa: F841
    with pytest.raises(FormulaError, match=r"it hides the formula function C\(\)"):
        sparsemix.lmer("y ~ C(f) + (1 | g)", data)


def test_builtins_dunders_attributes_and_values_stay_refused(data, tmp_path):
    import math
    import os

    marker = tmp_path / "ran"
    run = exec  # noqa: F841 - a builtin under another name
    mu = 3.0  # noqa: F841 - a value, not a function

    def _private(v):
        return v

    refused = {
        f"y ~ exec(\"open('{marker}', 'w')\")": "one of Python's builtins",
        f'y ~ open("{marker}", "w")': "one of Python's builtins",
        'y ~ getattr(x, "real")': "one of Python's builtins",
        "y ~ sum(x)": "one of Python's builtins",
        "y ~ type(x)": "one of Python's builtins",
        f"y ~ run(\"open('{marker}', 'w')\")": "held in the calling code as one of Python's builtins",
        f'y ~ __import__("pathlib").Path("{marker}").touch()': "uses an attribute",
        'y ~ __import__("pathlib")': "names starting with '_'",
        "y ~ _private(x)": "names starting with '_'",
        "y ~ math.log(z)": r"attribute \(math.log\)",
        f'y ~ os.system("touch {marker}")': r"attribute \(os.system\)",
        "y ~ I(x - mu)": "in the calling code it is a float, not a function",
        "y ~ os": "in the calling code it is a module, not a function",
        'y ~ Q("__builtins__")': "'__builtins__', which is not a column",
    }
    for formula, message in refused.items():
        with pytest.raises(FormulaError, match=message):
            sparsemix.lmer(formula + " + (1 | g)", data)
        with pytest.raises(FormulaError, match=message):
            sparsemix.MixedLM.from_formula(formula, data, groups="g")
        with pytest.raises(FormulaError, match=message):
            sparsemix.MixedLM.from_formula("y ~ x", data, groups="g", re_formula=formula.split("~")[1])
    assert not marker.exists() and math.pi and os.sep
    d = data.rename(columns={"x": "sum", "z": "type"})  # as columns, builtins' names are the columns
    assert (
        sparsemix.lmer("y ~ sum + log(type) + (1 | g)", d).llf == sparsemix.lmer("y ~ x + log(z) + (1 | g)", data).llf
    )


def test_the_command_line_keeps_its_list(capsys, data, tmp_path):
    path = tmp_path / "data.csv"
    data.to_csv(path, index=False)
    # fit_record and read_table are functions of sparsemix.cli, where lmer is called from: not for formulas.
    for formula in ("y ~ fit_record(x) + (1 | g)", "y ~ read_table(x) + (1 | g)", "y ~ shifted(x) + (1 | g)"):
        code = main(["fit", str(path), "--formula", formula])
        err = capsys.readouterr().err
        assert code == 2 and "which is not a column of the data nor an allowed function" in err


def test_dask_refuses_the_callers_functions_with_the_reason(data):
    dd = pytest.importorskip("dask.dataframe")

    def times_two(v):
        return 2 * v

    with pytest.raises(FormulaError, match="calls a function of your code; with a Dask DataFrame"):
        sparsemix.lmer("y ~ times_two(x) + (1 | g)", dd.from_pandas(data, npartitions=2))
    with pytest.raises(FormulaError, match="one of Python's builtins"):
        sparsemix.lmer("y ~ sum(x) + (1 | g)", dd.from_pandas(data, npartitions=2))
    assert times_two(1) == 2


def test_numpys_constants_are_allowed_in_formulas(data):
    """nlme's Ovary model writes sin(2 * pi * Time); patsy users write np.pi. Other attributes stay refused."""
    frame = data.assign(t=np.linspace(0.0, 1.0, len(data)))
    written = sparsemix.lmer("y ~ np.sin(2 * np.pi * t) + (1 | g)", frame)
    computed = sparsemix.lmer("y ~ s + (1 | g)", frame.assign(s=np.sin(2 * np.pi * frame.t)))
    assert written.llf == pytest.approx(computed.llf, rel=1e-12)
    np.testing.assert_allclose(written.fe_params.to_numpy(), computed.fe_params.to_numpy(), rtol=1e-10)
    with pytest.raises(FormulaError, match="attribute"):
        sparsemix.lmer("y ~ np.linalg.norm(t) + (1 | g)", frame)
    with pytest.raises(FormulaError, match=r"uses 'e'.*write np\.e"):  # numpy's e is not R's: bare, no constant
        sparsemix.lmer("y ~ e * t + (1 | g)", frame)


def test_rs_pi_is_the_constant_in_every_door(data):
    """lme4's formulas write R's constant bare (nlme's Ovary: sin(2*pi*Time)): the same fit as np.pi's, in lmer and
    in the statsmodels door, kept with the fit for predict (newdata needs no `pi` column) and through pickle. A
    column named pi is the column; a caller's own pi of another value is refused, not read."""
    import pickle

    frame = data.assign(t=np.linspace(0.0, 1.0, len(data)))
    numpy_pi = sparsemix.lmer("y ~ np.sin(2 * np.pi * t) + (np.cos(np.pi * t) | g)", frame)
    bare = sparsemix.lmer("y ~ sin(2*pi*t) + (cos(pi*t) | g)", frame)
    assert bare.llf == pytest.approx(numpy_pi.llf, rel=1e-12)
    np.testing.assert_allclose(bare.fe_params.to_numpy(), numpy_pi.fe_params.to_numpy(), rtol=1e-10)
    new = frame.iloc[:7][["t", "g"]]
    np.testing.assert_allclose(bare.predict(new), numpy_pi.predict(new), rtol=1e-12)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(bare)).predict(new), bare.predict(new), rtol=0)
    mixed = sparsemix.MixedLM.from_formula("y ~ sin(2*pi*t)", frame, groups="g").fit()
    assert mixed.fe_params.iloc[1] == pytest.approx(
        sparsemix.MixedLM.from_formula("y ~ np.sin(2*np.pi*t)", frame, groups="g").fit().fe_params.iloc[1], rel=1e-10
    )
    from math import pi  # noqa: F401 (a caller's pi of the same value reads as the constant)

    assert sparsemix.lmer("y ~ sin(2*pi*t) + (1 | g)", frame).llf == pytest.approx(
        sparsemix.lmer("y ~ np.sin(2*np.pi*t) + (1 | g)", frame).llf, rel=1e-12
    )
    column = sparsemix.lmer("y ~ sin(2*pi*t) + (1 | g)", frame.assign(pi=1.0))
    assert column.llf == pytest.approx(sparsemix.lmer("y ~ sin(2*t) + (1 | g)", frame).llf, rel=1e-12)
    with pytest.raises(FormulaError, match="it hides the constant pi"):
        sparsemix.lmer("y ~ sin(2*pi*t) + (1 | g)", frame, eval_env={"pi": 3})


def test_numpys_constants_keep_the_columns_as_arrays(data):
    """`sin(2 * np.pi * t)` (nlme's Ovary model) is evaluated on the numeric columns as numpy arrays, as `sin(t)` is,
    not through pandas' Series (Ovary's fit 20-25 ms -> ~8 ms); a caller's own function named `pi` is not numpy's."""
    import patsy

    from sparsemix.formula.mixedlm import FrameColumns, patsy_data
    from sparsemix.formula.safety import safe_environment

    frame = data.assign(t=np.linspace(0.0, 1.0, len(data)))
    for formula in ("y ~ sin(2 * np.pi * t)", "y ~ np.cos(np.pi * t) + np.e * t", "y ~ sin(2 * pi * t)"):
        desc = patsy.ModelDesc.from_formula(formula)
        assert isinstance(patsy_data(frame, desc, safe_environment()), FrameColumns), formula
    desc = patsy.ModelDesc.from_formula("y ~ pi(t)")
    assert patsy_data(frame, desc, safe_environment({"pi": lambda v: v})) is frame


# -- the design's fixed cost: cached parsing, numeric columns as arrays (issue 16) -------------------------


SLEEP = reference_data("sleepstudy")


def _design(formula, data, eval_env=None):
    from sparsemix.formula.safety import safe_environment
    from sparsemix.lme4.design import build_design

    return build_design(formula, data, eval_env=safe_environment(eval_env))


def test_the_same_formula_text_on_other_data_gives_that_datas_design():
    # the caches are keyed by text only where the result is a function of the text; the design is the data's
    a = SLEEP.copy()
    b = SLEEP.assign(Days=SLEEP.Days * 2.0, Reaction=SLEEP.Reaction[::-1].to_numpy())
    c = SLEEP.rename(columns={"Days": "days"})
    for _ in range(2):
        da = _design("Reaction ~ Days + I(Days**2) + (Days | Subject)", a)
        db = _design("Reaction ~ Days + I(Days**2) + (Days | Subject)", b)
        np.testing.assert_array_equal(da.X[:, 1], a.Days)
        np.testing.assert_array_equal(db.X[:, 1], b.Days)
        np.testing.assert_array_equal(db.X[:, 2], b.Days**2)
        np.testing.assert_array_equal(db.y, b.Reaction)
        with pytest.raises(FormulaError, match="'Days'"):
            _design("Reaction ~ Days + I(Days**2) + (Days | Subject)", c)
        dc = _design("Reaction ~ days + (days | Subject)", c)
        assert dc.fe_names == ("(Intercept)", "days")
        np.testing.assert_array_equal(dc.X, da.X[:, :2])


def test_a_formula_read_again_is_checked_again_against_the_namespace():
    data = SLEEP.assign(x=SLEEP.Days + 1.0)
    f = "Reaction ~ twice(x) + (1 | Subject)"
    d = _design(f, data, {"twice": lambda v: 2 * v})
    np.testing.assert_array_equal(d.X[:, 1], 2 * data.x)
    with pytest.raises(FormulaError, match="twice"):
        _design(f, data, {})  # the cached reading of the text does not carry the earlier namespace
    with pytest.raises(FormulaError, match="not a function"):
        _design(f, data, {"twice": 2.0})


def test_a_callers_function_gets_the_columns_series_and_c_its_levels_as_before():
    seen = []

    def record(v):
        seen.append(type(v))
        return v * 1.0

    data = SLEEP.assign(k=(SLEEP.Days % 3).astype(np.int64))
    d = _design("Reaction ~ record(Days) + C(k) + (1 | Subject)", data, {"record": record})
    assert seen and all(t is pd.Series for t in seen)  # a caller's function may use the Series' methods
    assert sorted(d.fe_names) == ["(Intercept)", "C(k)[T.1]", "C(k)[T.2]", "record(Days)"]
    (c_k,) = [info for f, info in d.fixed_info.factor_infos.items() if f.name() == "C(k)"]
    assert c_k.categories == (0, 1, 2) and all(
        type(v) is int for v in c_k.categories
    )  # Python's, as patsy reads a Series


def test_numeric_columns_read_as_arrays_give_the_frames_design():
    from sparsemix.formula.mixedlm import fixed_arrays, fixed_design
    from sparsemix.formula.safety import safe_environment

    env = safe_environment()
    data = SLEEP.assign(z=np.arange(len(SLEEP)) % 7, s=np.where(SLEEP.Days > 4, "hi", "lo"))
    data.index = np.arange(len(data))[::-1] * 3  # not a default index
    for f in [
        "Reaction ~ Days + I(Days**2) + np.log(Days + 1) + center(z) + poly(Days, 2) + s + (Days > 3)",
        "Reaction ~ Days * s + scale(z)",
    ]:
        y, X, names, info = fixed_arrays(f, data, env)
        endog, exog, info_frame = fixed_design(f, data, env)
        np.testing.assert_array_equal(y, endog.to_numpy())
        np.testing.assert_array_equal(X, exog.to_numpy(dtype=float))
        assert names == list(exog.columns) == info.column_names == info_frame.column_names


def test_random_intercepts_share_one_design_and_other_terms_their_own():
    d = _design("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", SLEEP)
    e = _design("Reaction ~ 1 + (1 | Subject)", SLEEP.assign(Reaction=SLEEP.Reaction + 1))
    assert d.term_info[0].design_info is e.term_info[0].design_info
    assert d.term_info[0].design_info.column_names == ["Intercept"]
    assert d.term_info[1].columns == ("Days",)
    np.testing.assert_array_equal(e.y, SLEEP.Reaction + 1)


def test_a_kept_numeric_design_is_only_reused_for_the_same_columns_and_dtypes():
    from sparsemix.formula import mixedlm

    f = "Reaction ~ Days + np.log(Days + 1) + (Days | Subject)"
    a = _design(f, SLEEP)
    keys = [k for k in mixedlm._KEPT_DESIGNS if k[1] == f.split(" + (")[0] or k[1] == "~ Days"]
    assert keys  # the fixed part's and the random term's designs are kept
    b = _design(f, SLEEP.assign(Days=SLEEP.Days * 3))  # same dtypes: the design reused, the values the data's
    np.testing.assert_array_equal(b.X[:, 1], SLEEP.Days * 3)
    np.testing.assert_array_equal(b.X[:, 2], np.log(SLEEP.Days * 3 + 1))
    assert b.fixed_info is a.fixed_info
    e = _design(f, SLEEP.assign(Days=SLEEP.Days * 3.0))  # float, not int: a design of its own, the same values
    assert e.fixed_info is not a.fixed_info
    np.testing.assert_array_equal(e.X, b.X)
    # another dtype (text): another design, patsy's levels as before
    c = _design("Reaction ~ Days + (1 | Subject)", SLEEP.assign(Days=SLEEP.Days.map(lambda d: f"d{d}")))
    assert c.fe_names[1:3] == ("Days[T.d1]", "Days[T.d2]") and len(c.fe_names) == 10
    # extra columns: another key (which names are columns can change); the same design content
    d = _design(f, SLEEP.assign(extra=1.0))
    np.testing.assert_array_equal(d.X, a.X)


def test_a_column_named_like_a_namespace_entry_keeps_its_design_and_reads_the_data():
    """nlme's RatPupWeight has a column `Treatment`, also patsy's contrast class: patsy reads the data first, so the
    design may be kept (it was built again on every fit: 3.9 ms of a 6.4 ms fit), and its values are the column's."""
    import patsy

    f = "Reaction ~ Days + Treatment + (1 | Subject)"
    first = SLEEP.assign(Treatment=np.where(SLEEP.Days % 3 == 0, "high", np.where(SLEEP.Days % 3 == 1, "low", "mid")))
    second = first.assign(Treatment=first.Treatment.to_numpy()[::-1])  # the same levels, other rows
    a, b = _design(f, first), _design(f, second)
    assert b.fixed_info is a.fixed_info
    assert b.fe_names == ("(Intercept)", "Days", "Treatment[T.low]", "Treatment[T.mid]")
    expected = patsy.dmatrix("Days + Treatment", second, NA_action="raise", return_type="dataframe")
    np.testing.assert_array_equal(b.X, expected.rename(columns={"Intercept": "(Intercept)"})[list(b.fe_names)])
    m = sparsemix.lmer(f, second)
    assert m.fe_params["Treatment[T.low]"] == pytest.approx(
        sparsemix.lmer(f.replace("Treatment", "arm"), second.rename(columns={"Treatment": "arm"})).fe_params[
            "arm[T.low]"
        ],
        rel=1e-12,
    )


def test_a_kept_designs_expressions_are_evaluated_as_patsy_evaluates_them(monkeypatch):
    """A kept design's numerical expressions (I(Days**2), np.sqrt(...)) are evaluated without patsy's build: the
    same columns as patsy's own build, and the same errors where an expression fails on other data."""
    import patsy

    from sparsemix.formula import mixedlm

    f = "Reaction ~ Days + I(Days**2) + np.sqrt(Days + 1) + (1 + I(Days**2) | Subject)"
    data = SLEEP.assign(Days=SLEEP.Days * 3)  # the same dtype: the same key
    first = _design(f, SLEEP)  # the designs kept
    with monkeypatch.context() as m:  # the kept designs' columns come without patsy's build
        m.setattr(mixedlm.patsy, "build_design_matrices", lambda *a, **k: pytest.fail("patsy's build was called"))
        d = _design(f, data)
    assert d.fixed_info is first.fixed_info and d.term_info[0].design_info is first.term_info[0].design_info
    assert list(d.fixed_info.column_names) == ["Intercept", "Days", "I(Days ** 2)", "np.sqrt(Days + 1)"]
    expected = np.asarray(patsy.build_design_matrices([d.fixed_info], data, NA_action="raise")[0])
    np.testing.assert_array_equal(d.X, expected)
    np.testing.assert_array_equal(d.X[:, 2], (SLEEP.Days * 3) ** 2)
    z = d.terms[0].Z.toarray().reshape(len(data), -1, 2).sum(axis=1)
    np.testing.assert_array_equal(z[:, 1], (SLEEP.Days * 3) ** 2)
    # on data where the expression is not defined (NaN): patsy's build reports it, as on a first fit
    with pytest.raises(FormulaError, match="missing values|NaN"):
        _design(f, SLEEP.assign(Days=SLEEP.Days - 3))


def test_a_stateful_transform_is_fitted_to_each_data_set():
    f = "Reaction ~ center(Days) + scale(Days) + poly(Days, 2) + (1 | Subject)"
    a = _design(f, SLEEP)
    b = _design(f, SLEEP.assign(Days=SLEEP.Days + 10.0))
    np.testing.assert_allclose(a.X, b.X, atol=1e-9)  # centred on each data set's own mean
    np.testing.assert_allclose(a.X[:, 1], SLEEP.Days - SLEEP.Days.mean())
    assert a.fixed_info is not b.fixed_info


def test_rs_dotted_column_names_are_columns_in_every_part_of_a_formula():
    """R's data sets name columns with dots (mlmRev's bdf: `IQ.verb`, `langPOST`); to Python `IQ.verb` is the
    attribute `verb` of `IQ`, and the fit was a FormulaError. The dotted model fits as the one on renamed columns,
    keeps the names as written, drops rows missing a dotted column and predicts from newdata."""
    plain = SLEEP.assign(g=SLEEP.Subject)
    dotted = SLEEP.rename(columns={"Days": "Days.n"}).assign(**{"subject.id": SLEEP.Subject})
    m = sparsemix.lmer("Reaction ~ Days + np.log(Days + 1) + (Days | g)", plain)
    d = sparsemix.lmer("Reaction ~ Days.n + np.log(Days.n + 1) + (Days.n | subject.id)", dotted)
    assert d.llf == pytest.approx(m.llf, rel=1e-12)
    assert list(d.fe_params.index) == ["(Intercept)", "Days.n", "np.log(Days.n + 1)"]
    np.testing.assert_allclose(d.fe_params.to_numpy(), m.fe_params.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(d.predict(dotted.head(5)), m.predict(plain.head(5)), rtol=1e-10)
    missing = dotted.copy()
    missing.loc[:9, "Days.n"] = np.nan
    assert sparsemix.lmer("Reaction ~ Days.n + (1 | subject.id)", missing).design.n_dropped == 10
    # statsmodels' door reads the same formulas
    sm_dotted = sparsemix.MixedLM.from_formula("Reaction ~ Days.n", dotted, groups="subject.id", re_formula="~Days.n")
    sm_plain = sparsemix.MixedLM.from_formula("Reaction ~ Days", plain, groups="g", re_formula="~Days")
    assert sm_dotted.fit().llf == pytest.approx(sm_plain.fit().llf, rel=1e-12)


@pytest.mark.parametrize(
    "formula", ["Reaction ~ Days", "Reaction ~ 0 + Days + w", "Reaction ~ Days * w + Days:off", "Reaction ~ 1"]
)
def test_a_kept_plain_column_design_is_built_as_patsy_builds_it(formula):
    """Designs whose factors are all bare numeric columns are built without patsy's machinery once kept
    (mixedlm._plain_columns): the same matrices, names and design as patsy.dmatrices gives."""
    import patsy

    from sparsemix.formula.mixedlm import fixed_arrays
    from sparsemix.formula.safety import safe_environment

    data = SLEEP.assign(Days=SLEEP.Days.astype("int32"))  # an integer column is read as float, as patsy does
    env = safe_environment()
    fixed_arrays(formula, data, env)  # kept
    y, X, names, info = fixed_arrays(formula, data, env)
    py, pX = patsy.dmatrices(formula, data, return_type="matrix")
    np.testing.assert_array_equal(y, np.asarray(py)[:, 0])
    np.testing.assert_array_equal(X, np.asarray(pX))
    assert names == pX.design_info.column_names and X.dtype == np.float64
    # a missing value goes to patsy, which finds it
    with pytest.raises(FormulaError, match="missing values"):
        fixed_arrays(formula.replace("Reaction", "w"), data.assign(w=np.r_[np.nan, data.w.to_numpy()[1:]]), env)


@pytest.mark.parametrize(
    "formula",
    [
        "angle ~ recipe * temperature",
        "angle ~ 0 + recipe + temperature:x",
        "angle ~ x * recipe + hot + recipe:hot",
        "angle ~ recipe:temperature",
    ],
)
def test_a_kept_design_with_factors_is_built_as_patsy_builds_it(formula):
    """Designs whose factors are bare columns that carry their levels (Categoricals, booleans) are kept as well and
    built from the factors' codes and patsy's contrast matrices: the same matrices and names as patsy gives, a
    Categorical with other categories (or another order) gets its own design, and a missing level goes to patsy."""
    import patsy

    from sparsemix.formula.mixedlm import fixed_arrays
    from sparsemix.formula.safety import safe_environment

    rng = np.random.default_rng(5)
    n = 60
    data = pd.DataFrame(
        {
            "angle": rng.normal(size=n),
            "recipe": pd.Categorical(rng.choice(["C", "A", "B"], n), categories=["A", "B", "C"]),
            "temperature": pd.Categorical(rng.choice(["175", "185", "195", "205"], n)),
            "x": rng.normal(size=n),
            "hot": rng.random(n) > 0.5,
        }
    )
    env = safe_environment()
    for frame in (data, data.assign(recipe=data.recipe.cat.reorder_categories(["C", "A", "B"]))):
        fixed_arrays(formula, frame, env)  # kept
        y, X, names, info = fixed_arrays(formula, frame, env)
        py, pX = patsy.dmatrices(formula, frame, return_type="matrix")
        np.testing.assert_array_equal(X, np.asarray(pX))
        np.testing.assert_array_equal(y, np.asarray(py)[:, 0])
        assert names == pX.design_info.column_names
    missing = data.assign(recipe=data.recipe.astype(object).where(np.arange(n) > 0).astype("category"))
    with pytest.raises(FormulaError, match="missing values"):
        fixed_arrays(formula, missing, env)


def test_rs_factor_and_as_factor_read_a_numeric_column_as_a_factor():
    """lme4's users write factor(Days) and as.factor(Days) (lme4's fit of factor(age) on Orthodont: test_boundary's
    fixtures): patsy's C(Days) under R's name, in every door, with its levels kept for predict and through pickle;
    factor's `levels` set the order (the first the baseline)."""
    import pickle

    data = SLEEP.assign(day=SLEEP.Days % 3)
    explicit = sparsemix.lmer("Reaction ~ C(day) + (1 | Subject)", data)
    for written in ("factor(day)", "as.factor(day)", "as.factor( day )"):
        fit = sparsemix.lmer(f"Reaction ~ {written} + (1 | Subject)", data)
        assert fit.llf == pytest.approx(explicit.llf, rel=1e-12), written
        assert list(fit.fe_params.index) == ["(Intercept)", "factor(day)[T.1]", "factor(day)[T.2]"]
        np.testing.assert_allclose(fit.fe_params.to_numpy(), explicit.fe_params.to_numpy(), rtol=1e-10)
    new = data.iloc[[5, 1, 9]]
    np.testing.assert_allclose(pickle.loads(pickle.dumps(fit)).predict(new), explicit.predict(new), rtol=1e-10)
    mixed = sparsemix.MixedLM.from_formula("Reaction ~ factor(day)", data, groups="Subject").fit()
    assert mixed.llf == pytest.approx(explicit.llf, rel=1e-9)
    releveled = sparsemix.lmer("Reaction ~ factor(day, levels=[2, 0, 1]) + (1 | Subject)", data)
    assert releveled.llf == pytest.approx(explicit.llf, rel=1e-12)
    shift = explicit.fe_params.iloc[2]  # day 2 against day 0, now the baseline's negative
    assert releveled.fe_params.iloc[1] == pytest.approx(-shift, rel=1e-9)
    with pytest.raises(FormulaError, match=r"uses an attribute \(has.factor\)"):  # (not rewritten inside a name)
        sparsemix.lmer("Reaction ~ has.factor(day) + (1 | Subject)", data)
    with pytest.raises(FormulaError, match=r"levels must be the list of the levels in order.*got 3"):
        sparsemix.lmer("Reaction ~ factor(day, 3) + (1 | Subject)", data)
    # a grouping is a factor already: (1 | factor(Subject)) reads as (1 | Subject) (which lme4 1.1-31 refuses)
    plain = sparsemix.lmer("Reaction ~ Days + (Days | Subject)", data)
    for group in ("factor(Subject)", "as.factor( Subject )"):
        wrapped = sparsemix.lmer(f"Reaction ~ Days + (Days | {group})", data)
        assert wrapped.llf == pytest.approx(plain.llf, rel=1e-12)
        assert wrapped.ngroups == {"Subject": 18}


def test_a_factors_indicator_columns_are_named_as_patsy_names_them_on_every_path():
    """`(0 + C(g) | s)` and `(0 + factor(g) | s)` take the sparse indicator path (no patsy design), `(C(g) + 0 | s)` and
    `(0 + g | s)` patsy's; the same columns get patsy's names on both (as the fixed effects' `g[T.B]`), in lmer and
    in from_formula's re_formula and vc_formula."""
    rng = np.random.default_rng(11)
    n = 240
    data = pd.DataFrame({"s": rng.integers(0, 16, n), "g": rng.choice(["A", "B", "C"], n), "x": rng.normal(size=n)})
    data["y"] = data.x + (data.g == "B") + rng.normal(size=16)[data.s] + rng.normal(size=n)
    names = {}
    for call in ("C(g)", "factor(g)"):
        fast = sparsemix.lmer(f"y ~ x + (0 + {call} | s)", data)
        by_patsy = sparsemix.lmer(f"y ~ x + ({call} + 0 | s)", data)
        assert [info.indicator for info in fast.design.term_info] == ["g"]  # the indicator path
        assert [info.indicator for info in by_patsy.design.term_info] == [None]
        assert fast.llf == pytest.approx(by_patsy.llf, rel=1e-10)
        names[call] = list(fast.ranef()["s"].columns)
        assert names[call] == list(by_patsy.ranef()["s"].columns) == [f"{call}[{v}]" for v in "ABC"]
        assert list(fast.variance_components().query("var2.isna()").var1.iloc[:3]) == names[call]
        mixed = sparsemix.MixedLM.from_formula("y ~ x", data, groups="s", re_formula=f"0 + {call}").fit()
        assert list(mixed.random_effects[0].index) == names[call]
        assert mixed.llf == pytest.approx(fast.llf, rel=1e-6)
        vc = sparsemix.MixedLM.from_formula("y ~ x", data, groups="s", vc_formula={"gs": f"0 + {call}"}).fit()
        by_lmer = sparsemix.lmer("y ~ x + (1 | s:g)", data)
        assert vc.llf == pytest.approx(by_lmer.llf, rel=1e-8)
        assert set(vc.random_effects[0].index) == {f"gs[{name}]" for name in names[call]}
    plain = sparsemix.lmer("y ~ x + (0 + g | s)", data)
    assert list(plain.ranef()["s"].columns) == ["g[A]", "g[B]", "g[C]"]


@pytest.mark.parametrize(
    "formula",
    [
        "Reaction ~ C(Days) + (1 | Subject)",
        "Reaction ~ factor(Days) * w + (1 | Subject)",
        "Reaction ~ C(w):Days + C(g)",
    ],
)
def test_a_kept_design_with_a_column_read_as_a_factor_is_built_as_patsy_builds_it(formula, monkeypatch):
    """C(x) and factor(x) of a bare column send patsy to the frame (their levels are the column's values), but their
    design is kept under those levels and rebuilt from the column's codes (Orthodont's factor(age): 12.1 -> 3.3 ms):
    the same matrix and names as patsy's, data with other levels a design of their own, a caller's own C() never
    taken for patsy's."""
    import patsy

    from sparsemix.formula import mixedlm
    from sparsemix.formula.safety import safe_environment

    formula = formula if "|" in formula else formula + " + (1 | Subject)"
    data = SLEEP.assign(w=SLEEP.Days % 3, g=np.where(SLEEP.Days > 4, "late", "early"))
    first = _design(formula, data)
    other = data.assign(Reaction=data.Reaction[::-1].to_numpy())  # the same columns and levels: the design kept
    with monkeypatch.context() as m:
        m.setattr(mixedlm.patsy, "build_design_matrices", lambda *a, **k: pytest.fail("patsy's build was called"))
        kept = _design(formula, other)
    assert kept.fixed_info is first.fixed_info
    fixed, env = formula.split(" + (")[0], safe_environment()
    _, expected = patsy.dmatrices(fixed, other, NA_action="raise", return_type="dataframe", eval_env=env)
    np.testing.assert_array_equal(kept.X, expected.to_numpy()[:, list(kept.fixed_columns)])
    # days 0-6 only: where Days is read as a factor, fewer levels and another design (patsy's); w's and g's the same
    fewer = other[other.Days < 7]
    _, expected = patsy.dmatrices(fixed, fewer, NA_action="raise", return_type="dataframe", eval_env=env)
    smaller = _design(formula, fewer)
    assert (smaller.fixed_info is first.fixed_info) == ("(Days)" not in fixed)
    np.testing.assert_array_equal(smaller.X, expected.to_numpy()[:, list(smaller.fixed_columns)])

    def C(x):  # noqa: N802 (a caller's own C, shadowing patsy's)
        return np.asarray(x, dtype=float) * 2.0

    if "C(Days)" in formula:
        own = _design(formula, other, eval_env={"C": C})
        assert own.fe_names == ("(Intercept)", "C(Days)")
        np.testing.assert_array_equal(own.X[:, 1], other.Days * 2.0)
