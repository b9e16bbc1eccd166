"""lme4's formula language: bar terms, expansion, and errors that point at the offending character."""

import re

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
