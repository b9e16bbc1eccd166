"""lme4's formula language: bar terms, expansion, and errors that point at the offending character."""

import re

import numpy as np
import pandas as pd
import pytest

from sparsemix import FormulaError
from sparsemix.formula.lme4 import parse_formula


def _random(formula):
    return [(s.expr, s.group) for s in parse_formula(formula).random]


@pytest.mark.parametrize(
    "formula, fixed, random",
    [
        ("y ~ x + (1 | g)", "y ~ x", [("1", ("g",))]),
        ("y ~ (x | g)", "y ~ 1", [("x", ("g",))]),
        ("y ~ 1 + x + (1 + x | g) + (1 | h)", "y ~ 1 + x", [("1 + x", ("g",)), ("1", ("h",))]),
        ("y ~ 0 + x + (0 + x | g)", "y ~ 0 + x", [("0 + x", ("g",))]),
        ("y ~ x + (1 | a/b)", "y ~ x", [("1", ("a",)), ("1", ("b", "a"))]),
        ("y ~ x + (1 | a/b/c)", "y ~ x", [("1", ("a",)), ("1", ("b", "a")), ("1", ("c", "b", "a"))]),
        ("y ~ x + (1 | a:b)", "y ~ x", [("1", ("a", "b"))]),
        ("y ~ x + (x || g)", "y ~ x", [("1", ("g",)), ("0 + x", ("g",))]),
        ("y ~ x + (0 + x + z || g)", "y ~ x", [("0 + x", ("g",)), ("0 + z", ("g",))]),
        ("y ~ I(x + 1) + log(z) + (1|g)", "y ~ I(x + 1) + log(z)", [("1", ("g",))]),
        ("y ~ x * f + (1 | g) + (1 | h) + (1 | k)", "y ~ x * f", [("1", ("g",)), ("1", ("h",)), ("1", ("k",))]),
    ],
)
def test_bar_terms_are_found_and_expanded(formula, fixed, random):
    parsed = parse_formula(formula)
    assert parsed.fixed == fixed
    assert _random(formula) == random


@pytest.mark.parametrize(
    "formula, message, column",
    [
        ("y ~ x + (1 | g", "never closed", 8),
        ("y ~ x + 1 | g)", "no matching", 13),
        ("y ~ x + 1 | g", "must be in parentheses", 10),
        ("~ x + (1 | g)", "no response", 0),
        ("y ~ x ~ (1|g)", "exactly one '~'", 6),
        ("y ~ x + ( | g)", "nothing before '|'", 10),
        ("y ~ x + (1 | )", "no grouping factor", 11),
        ("y ~ x + (1 | a + b)", "'+' is not allowed", 15),
        ("y ~ x + (1 | a*b)", "'*' is not allowed", 14),
    ],
)
def test_syntax_errors_point_at_the_token(formula, message, column):
    with pytest.raises(FormulaError, match=re.escape(message)) as info:
        parse_formula(formula)
    lines = str(info.value).splitlines()
    assert lines[-2].strip() == formula
    assert lines[-1].index("^") - 4 == column


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    "n, numbered",
    [(1, False), (30, False), (400, False), (401, False), (999, False), (1000, False), (3000, False), (3000, True)],
)
def test_sorted_codes_of_text_are_numpys_unique_at_every_length(n, numbered, chunked):
    """Text is factorized in Python (short columns) or by Arrow's dictionary encoding (long ones, in one chunk or
    several; its distinct values sorted in Python, or by Arrow where there are many: `numbered`, ~2,600): every
    path gives np.unique's sorted levels and inverse, code-point order included (accents, case, digits, the empty
    string)."""
    from sparsemix.formula.mixedlm import PYTHON_SORT_MAX_LEVELS, sorted_codes

    rng = np.random.default_rng(n)
    alphabet = np.array(["b", "B", "a", "é", "e", "10", "9", "", "zz", "Ä", "a b", "日本"])
    values = pd.Series(alphabet[rng.integers(0, alphabet.size, n)]).astype("str")
    if numbered:
        values = values + pd.Series(rng.integers(0, 5000, n).astype(str)).astype("str")
        assert values.nunique() > PYTHON_SORT_MAX_LEVELS
    if chunked:  # (pandas keeps a concatenation's Arrow chunks)
        values = pd.concat([values[: n // 2], values[n // 2 :]], ignore_index=True)
    codes, levels = sorted_codes(values)
    expected_levels, expected_codes = np.unique(values.to_numpy(dtype=object), return_inverse=True)
    assert list(levels) == list(expected_levels)
    np.testing.assert_array_equal(codes, expected_codes)
    assert codes.dtype == np.int64


def test_text_with_a_missing_value_is_factorized_as_pandas_does():
    """Callers drop missing values first; a column that still holds one leaves Arrow's route for pandas' factorize
    (the missing row coded -1, not a level)."""
    from sparsemix.formula.mixedlm import sorted_codes

    values = pd.Series(["b", "a", None, "c"] * 200, dtype="str")
    codes, levels = sorted_codes(values)
    expected_codes, expected_levels = pd.factorize(values, sort=True)
    assert list(levels) == list(expected_levels) == ["a", "b", "c"]
    np.testing.assert_array_equal(codes, expected_codes)
    assert codes[2] == -1


@pytest.mark.parametrize("n, levels", [(40, 3), (300, 25), (100, 2000)])
def test_group_codes_of_an_interaction_number_the_combinations_present_in_order(n, levels):
    """(1 | a:b:c): the combinations that occur, numbered in the order of a's levels, then b's, then c's (R's
    factor(a:b:c) without unused levels), by the mask over the combinations' range (small) or by sorting (large)."""
    from sparsemix.formula.design_rules import group_codes

    rng = np.random.default_rng(levels)
    frame = pd.DataFrame({v: rng.integers(0, levels, n) for v in "abc"})
    frame["a"] = frame["a"].astype(str)
    codes, labels = group_codes(frame, ("a", "b", "c"))
    keys = sorted(set(zip(frame["a"], frame["b"], frame["c"])))
    assert labels == tuple(f"{a}:{b}:{c}" for a, b, c in keys)
    position = {key: i for i, key in enumerate(keys)}
    expected = [position[key] for key in zip(frame["a"], frame["b"], frame["c"])]
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize(
    "formula",
    [
        "~ x",
        "~ 0 + x",
        "~ 1 + x",
        "~ x - 1",
        "~ z + x",
        "~ -1 + z + x + 1",
        "y ~ n + x",
        "y ~ 1",
        "n ~ 0 + x",
        "yield ~ x",
    ],
)
def test_a_design_of_bare_numeric_columns_is_patsys(formula):
    """A formula of an intercept and bare numeric columns, read straight from the columns (mixedlm._bare_columns),
    gives patsy's matrices: the same values, names and order, and designs that rebuild them from other data as
    patsy's do."""
    import patsy

    from sparsemix.formula import mixedlm
    from sparsemix.formula.safety import check_formula, safe_environment

    rng = np.random.default_rng(3)
    data = pd.DataFrame(
        {
            "y": rng.normal(size=9),
            "x": rng.normal(size=9),
            "z": rng.normal(size=9),
            "n": np.arange(9),
            "g": list("abc") * 3,
            "yield": np.linspace(1, 2, 9),  # (a Python keyword: the formula reads it as Q("yield"))
        }
    )
    reader, env = mixedlm.FrameColumns(data), safe_environment()
    desc = check_formula(formula, reader.names, env)
    fn = patsy.dmatrices if formula.split("~")[0].strip() else patsy.dmatrix
    assert mixedlm._bare_columns(fn, desc, reader) is not None
    ours = mixedlm.numeric_design(fn, formula, desc, data, env, columns=reader)
    theirs = fn(desc, data, return_type="matrix", NA_action="raise", eval_env=env)
    ours, theirs = (ours, theirs) if fn is patsy.dmatrices else ((ours,), (theirs,))
    other = data.iloc[::-1].reset_index(drop=True)
    for mine, patsys in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(patsys))
        assert mine.design_info.column_names == patsys.design_info.column_names
        (rebuilt,) = patsy.build_design_matrices([mine.design_info], other)
        (expected,) = patsy.build_design_matrices([patsys.design_info], other)
        np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(expected))


@pytest.mark.parametrize("formula", ["~ I(x**2)", "~ x:z", "~ np.log(n + 1)", "~ b", "~ g", "~ x + g", "~ m", "m ~ x"])
def test_other_designs_take_patsys_path(formula):
    """Anything but bare columns of numbers without a missing value is left to patsy (which reports the missing
    value)."""
    import patsy

    from sparsemix.formula import mixedlm
    from sparsemix.formula.safety import check_formula, safe_environment

    data = pd.DataFrame(
        {"x": [1.0, 2, 3], "z": [0.5, 1, 2], "n": [1, 2, 3], "b": [True, False, True], "g": list("abc")}
    ).assign(m=[1.0, np.nan, 2.0])
    reader = mixedlm.FrameColumns(data)
    fn = patsy.dmatrices if formula.split("~")[0].strip() else patsy.dmatrix
    desc = check_formula(formula, reader.names, safe_environment())
    assert mixedlm._bare_columns(fn, desc, reader) is None


@pytest.mark.parametrize("formula", ['y ~ Q("my g") + x', 'y ~ Q("my g") * x', "yield ~ g"])
def test_a_kept_design_rebuilt_from_quoted_columns_is_patsys(formula):
    """A kept design whose factors are quoted columns (Q("my g"), a keyword's Q("yield")) is rebuilt from the columns
    (mixedlm._plain_columns) as patsy builds it."""
    import patsy

    from sparsemix.formula import mixedlm
    from sparsemix.formula.safety import check_formula, safe_environment

    rng = np.random.default_rng(5)
    data = pd.DataFrame({"y": rng.normal(size=12), "x": rng.normal(size=12), "g": list("abcd") * 3})
    data = data.assign(**{"my g": list("pqr") * 4, "yield": rng.normal(size=12)})
    env = safe_environment()
    desc = check_formula(formula, tuple(data.columns), env)
    theirs = patsy.dmatrices(desc, data, return_type="matrix", NA_action="raise", eval_env=env)
    for _ in range(2):  # the first call keeps the design, the second rebuilds it from the columns
        reader = mixedlm.FrameColumns(data)
        ours = mixedlm.numeric_design(patsy.dmatrices, formula, desc, data, env, columns=reader)
        for mine, patsys in zip(ours, theirs):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(patsys))
            assert mine.design_info.column_names == patsys.design_info.column_names
    key = mixedlm._design_key(patsy.dmatrices, formula, desc, data, mixedlm.FrameColumns(data), env)
    assert mixedlm._plain_columns(mixedlm._KEPT_DESIGNS[key], mixedlm.FrameColumns(data)) is not None
