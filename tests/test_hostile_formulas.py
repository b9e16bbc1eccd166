"""Formulas a hostile but fair user writes (issue 14): each is a fit or a FormulaError that names the cause,
never a RecursionError, a hang or another library's exception."""

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix import FormulaError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    n = 240
    g = rng.integers(0, 12, n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=12)[g] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g})


@pytest.mark.parametrize("formula", ['y ~ f"{x}" + (1 | g)', 'y ~ Q(f"x") + (1 | g)', "f'{y}' ~ x + (1 | g)"])
def test_f_strings_are_formula_errors(data, formula):
    with pytest.raises(FormulaError, match="not a plain string"):
        sparsemix.lmer(formula, data)


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ " + " + ".join(f"I(x + {i})" for i in range(600)) + " + (1 | g)",
        "y ~ I(" + " + ".join(["x"] * 5000) + ") + (1 | g)",
        "y ~ x + (1 + " + " + ".join(f"I(x * {i})" for i in range(600)) + " | g)",
    ],
)
def test_formulas_beyond_patsys_parser_say_so(data, formula):
    with pytest.raises(FormulaError, match="too long or too deeply nested"):
        sparsemix.lmer(formula, data)


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ I(10**10**10) + (1 | g)",
        "y ~ I(x**10**10) + (1 | g)",
        "y ~ I(2**(3*10**5)) + (1 | g)",
        "y ~ I(x**-(10**6)) + (1 | g)",
    ],
)
def test_exponents_that_cannot_be_computed_are_refused_at_once(data, formula):
    with pytest.raises(FormulaError, match="cannot be computed"):
        sparsemix.lmer(formula, data)


def test_a_reasonable_constant_power_still_fits(data):
    written = sparsemix.lmer("y ~ I(x**2**2) + (1 | g)", data)
    computed = sparsemix.lmer("y ~ x4 + (1 | g)", data.assign(x4=data.x**4))
    assert written.llf == pytest.approx(computed.llf, rel=1e-12)


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ x + (1 | g) + (1 | g)",
        "y ~ x + (1|g) + ( 1 | g )",
        "y ~ x + (1 + x | g) + (1+x|g)",
        "y ~ x + " + " + ".join(["(1 | g)"] * 500),
    ],
)
def test_a_repeated_random_term_is_unidentifiable(data, formula):
    """500 copies of (1 | g) used to hang."""
    with pytest.raises(FormulaError, match="appears more than once"):
        sparsemix.lmer(formula, data)


def test_distinct_terms_on_one_factor_still_fit(data):
    with pytest.warns(sparsemix.SingularFitWarning, match="g.x estimated at zero"):  # no slope variance simulated
        assert np.isfinite(sparsemix.lmer("y ~ x + (1 | g) + (0 + x | g)", data).llf)


@pytest.mark.parametrize("name", ["x+1", "a^b", "p|q", "t~s", "dose (mg)", "µ/𝔁"])
def test_backticks_quote_any_name(data, name):
    """docs/formulas.md: backticks quote any name; '+', '^', '|', '~' and characters outside the BMP inside them
    used to be read as formula syntax (or spaced out: 'x+1' became 'x + 1')."""
    renamed = data.rename(columns={"x": name, "g": name + "g"})
    quoted = sparsemix.lmer(f"y ~ `{name}` + (1 | `{name}g`)", renamed)
    plain = sparsemix.lmer("y ~ x + (1 | g)", data)
    assert quoted.llf == pytest.approx(plain.llf, rel=1e-12)
    np.testing.assert_allclose(quoted.fe_params.to_numpy(), plain.fe_params.to_numpy(), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, from the term itself
@pytest.mark.parametrize("response, column", [("log(z)", "z"), ("sqrt(z)", "z"), ("np.log(z - 1)", "z")])
def test_a_function_outside_its_domain_is_named_not_blamed_on_missing_data(data, response, column):
    frame = data.assign(z=data.x)  # negative values
    with pytest.raises(FormulaError, match="outside its domain") as info:
        sparsemix.lmer(f"{response} ~ 1 + (1 | g)", frame)
    assert "missing='drop'" not in str(info.value)


def _five_factor_frame(n_combos: int, repeats: int, seed: int = 0) -> pd.DataFrame:
    """Five grouping variables with n_combos levels each, in n_combos combinations that each occur `repeats`
    times: the product of the level counts (n_combos^5) passes 2^63 for n_combos >= 6,200."""
    rng = np.random.default_rng(seed)
    combos = pd.DataFrame({k: rng.permutation(n_combos) for k in "abcde"})
    frame = pd.concat([combos] * repeats, ignore_index=True)
    effect = rng.normal(size=n_combos)
    frame["x"] = rng.normal(size=len(frame))
    frame["y"] = frame.x + np.tile(effect, repeats) + rng.normal(size=len(frame))
    return frame


def test_an_interaction_whose_level_product_passes_2_to_the_63_is_coded():
    """Before: (1 | a:b:c:d:e) on five 7,000-level variables raised numpy's 'invalid dims' ValueError."""
    with pytest.raises(sparsemix.InputError, match="7000 levels for 7000 observations"):
        sparsemix.lmer("y ~ x + (1 | a:b:c:d:e)", _five_factor_frame(7000, 1))
    frame = _five_factor_frame(7000, 2)
    fit = sparsemix.lmer("y ~ x + (1 | a:b:c:d:e)", frame)
    assert fit.ngroups == {"a:b:c:d:e": 7000}
    # the levels in R's order for factor(a:b:c:d:e): by a, then b, ...
    expected = frame[list("abcde")].drop_duplicates().sort_values(list("abcde"))
    labels = [":".join(map(str, row)) for row in expected.itertuples(index=False)]
    assert list(fit.ranef()["a:b:c:d:e"].index) == labels


def test_rs_dot_for_every_other_column_says_to_name_them(data):
    with pytest.raises(
        sparsemix.FormulaError, match=r"'\.' \(every other column, as R's lm reads it\) is not expanded"
    ):
        sparsemix.lmer("y ~ . + (1 | g)", data)
