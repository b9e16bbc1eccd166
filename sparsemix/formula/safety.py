"""Formulas are data, not code: what a formula may call, checked before patsy evaluates anything.

patsy evaluates each term of a formula as Python. Formulas come from users, files and command lines, so every
term is parsed (Python's `ast`, nothing run) and must use only: the data's columns, numbers and strings,
arithmetic and comparisons, and calls of the functions in `SAFE_FUNCTIONS` (or `np.<name>` of those that are
numpy's). Anything else (`__import__`, attributes, subscripts, lambdas, unknown names) is a FormulaError that
names what was refused. A caller who needs another function passes it in `eval_env` (a trusted choice, made
in code, not in the formula).
"""
from __future__ import annotations

import ast
import difflib
from types import SimpleNamespace

import numpy as np
import patsy
import patsy.builtins

from ..errors import FormulaError
from .poly import poly

__all__ = ["SAFE_FUNCTIONS", "safe_environment", "check_formula", "check_terms"]

NUMPY_FUNCTIONS = ("log", "log2", "log10", "log1p", "exp", "expm1", "sqrt", "abs", "sin", "cos", "tan",
                   "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "floor", "ceil", "sign")
PATSY_FUNCTIONS = ("C", "I", "Q", "Treatment", "Sum", "Diff", "Helmert", "Poly", "center", "standardize",
                   "scale")
SAFE_FUNCTIONS = {**{name: getattr(np, name) for name in NUMPY_FUNCTIONS},
                  **{name: getattr(patsy.builtins, name) for name in PATSY_FUNCTIONS},
                  "poly": poly}
# `np.log(x)` and `numpy.log(x)` keep working: these names hold only the numpy functions above.
_NUMPY_ALIASES = ("np", "numpy")
_NUMPY_SUBSET = SimpleNamespace(**{name: getattr(np, name) for name in NUMPY_FUNCTIONS})

_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.UAdd, ast.USub, ast.Not,
              ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.Load)
_NODES = (ast.Expression, ast.Name, ast.Constant, ast.Call, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Compare,
          ast.BoolOp, ast.Attribute, ast.Tuple, ast.List) + _OPERATORS


def safe_environment(eval_env=None) -> patsy.EvalEnvironment:
    """The namespace formulas are evaluated in: the safe functions, then (when given) the caller's eval_env."""
    safe = dict(SAFE_FUNCTIONS, **{alias: _NUMPY_SUBSET for alias in _NUMPY_ALIASES})
    if eval_env is None:
        return patsy.EvalEnvironment([safe])
    if isinstance(eval_env, patsy.EvalEnvironment):
        return eval_env.with_outer_namespace(safe)
    if isinstance(eval_env, dict):
        return patsy.EvalEnvironment([eval_env, safe])
    raise FormulaError(f"eval_env must be a patsy.EvalEnvironment or a dict of names; got {type(eval_env).__name__}.")


def check_formula(formula: str, columns, env: patsy.EvalEnvironment, role: str = "formula") -> None:
    """Check every term of a patsy formula ('y ~ a + log(b)' or '~ 1 + x') without evaluating it."""
    try:
        desc = patsy.ModelDesc.from_formula(formula)
    except patsy.PatsyError as exc:
        raise FormulaError(f"cannot read {role} {formula!r}: {exc}") from None
    codes = [factor.code for term in desc.lhs_termlist + desc.rhs_termlist for factor in term.factors]
    check_terms(codes, columns, env, f"{role} {formula!r}")


def check_terms(codes, columns, env: patsy.EvalEnvironment, where: str) -> None:
    columns = {str(c) for c in columns}
    for code in codes:
        try:
            tree = ast.parse(code.strip(), mode="eval")
        except SyntaxError:
            raise FormulaError(f"{where}: cannot read the term {code!r}.") from None
        for node in ast.walk(tree):
            _check_node(node, code, columns, env, where)


def _check_node(node, code, columns, env, where):
    if not isinstance(node, _NODES):
        raise FormulaError(f"{where}: the term {code!r} uses Python syntax that formulas do not allow "
                           f"({type(node).__name__}). {_ALLOWED}")
    if isinstance(node, ast.Attribute):
        if not (isinstance(node.value, ast.Name) and node.value.id in _NUMPY_ALIASES
                and node.attr in NUMPY_FUNCTIONS):
            raise FormulaError(f"{where}: the term {code!r} uses an attribute ({ast.unparse(node)}); only "
                               f"np.<function> of the allowed numpy functions is accepted. {_ALLOWED}")
    elif isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in columns:
            raise FormulaError(f"{where}: the term {code!r} calls the column {node.func.id!r} as a function.")
        if not isinstance(node.func, (ast.Name, ast.Attribute)):
            raise FormulaError(f"{where}: the term {code!r} calls {ast.unparse(node.func)}, which is not an "
                               f"allowed function. {_ALLOWED}")
    elif isinstance(node, ast.Name):
        name = node.id
        if name.startswith("_") and name not in columns:
            raise FormulaError(f"{where}: the term {code!r} uses {name!r}; names starting with '_' are not "
                               f"allowed in formulas. {_ALLOWED}")
        if name not in columns and not _in_environment(env, name):
            close = difflib.get_close_matches(name, sorted(columns), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" {_ALLOWED}"
            raise FormulaError(f"{where} uses {name!r}, which is not a column of the data nor an allowed "
                               f"function.{hint}")


def _in_environment(env, name) -> bool:
    try:
        env.namespace[name]
        return True
    except KeyError:
        return False


_ALLOWED = ("Formulas may use the data's columns, arithmetic, comparisons and these functions: "
            + ", ".join(sorted(SAFE_FUNCTIONS)) + " (see docs/formulas.md); pass other functions in eval_env.")
