"""Formulas are data, not code: what a formula may call, checked before patsy evaluates anything.

patsy evaluates each term of a formula as Python. Formulas come from users, files and command lines, so every
term is parsed (Python's `ast`, nothing run) and must use only: the data's columns, numbers and strings,
R's constant `pi`, arithmetic and comparisons, and calls of the functions in `SAFE_FUNCTIONS` (or `np.<name>`
of those that are numpy's) or of functions in `eval_env`. The Python front doors pass the caller's namespace as
patsy does (`formula_environment`); the command line passes none. Python's builtins, names starting with '_',
attributes other than `np.<function>`, subscripts and lambdas are refused with a FormulaError that names what was
refused.

Columns named by Python keywords (`yield`, `class`, `True`) are syntax to Python, and R's dotted names (`IQ.verb`,
mlmRev's bdf) an attribute, so `readable_formula` has patsy evaluate such terms as `Q("yield")`, `Q("IQ.verb")`
while they keep the name written (`log(yield)`).
"""

from __future__ import annotations

import ast
import builtins
import difflib
import functools
import io
import json
import keyword
import tokenize
from types import SimpleNamespace

import numpy as np
import patsy
import patsy.builtins

from ..errors import FormulaError
from .factor import cut, factor, relevel
from .poly import poly
from .splines import bs, ns
from .vectors import c, ifelse, isin, pmax, pmin

__all__ = [
    "SAFE_FUNCTIONS",
    "safe_environment",
    "formula_environment",
    "check_formula",
    "check_terms",
    "code_names",
    "term_codes",
    "readable_formula",
    "is_dotted_name",
    "used_environment",
    "quoted_name",
    "numpy_functions_only",
    "provides_code",
]

NUMPY_FUNCTIONS = (
    "log",
    "log2",
    "log10",
    "log1p",
    "exp",
    "expm1",
    "sqrt",
    "abs",
    "sin",
    "cos",
    "tan",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "floor",
    "ceil",
    "sign",
)
PATSY_FUNCTIONS = ("C", "I", "Q", "Treatment", "Sum", "Diff", "Helmert", "Poly", "center", "standardize", "scale")
SAFE_FUNCTIONS = {
    **{name: getattr(np, name) for name in NUMPY_FUNCTIONS},
    **{name: getattr(patsy.builtins, name) for name in PATSY_FUNCTIONS},
    "poly": poly,
    "factor": factor,
    # R's, as lme4 users write them (formula/splines.py, factor.py, vectors.py)
    "ns": ns,
    "bs": bs,
    "relevel": relevel,
    "cut": cut,
    "ifelse": ifelse,
    "pmin": pmin,
    "pmax": pmax,
    "c": c,
    "isin": isin,
}
# `np.log(x)` and `numpy.log(x)` keep working: these names hold only the numpy functions above.
_NUMPY_ALIASES = ("np", "numpy")
# ... and numpy's constants (`sin(2 * np.pi * Time)`, nlme's Ovary model).
NUMPY_CONSTANTS = ("pi", "e")
_NUMPY_SUBSET = SimpleNamespace(**{name: getattr(np, name) for name in NUMPY_FUNCTIONS + NUMPY_CONSTANTS})
# R's constants (lme4's `sin(2*pi*Time)`, `include.lowest = TRUE`, `c(-Inf, 3, Inf)`): names of the formula
# language, looked up after the caller's names as the functions are (a column named pi comes first, as any column).
FORMULA_CONSTANTS = {"pi": float(np.pi), "TRUE": True, "FALSE": False, "Inf": float("inf")}
# Refused by name (`eval`, `open`, `getattr`, also `sum`, `type`) unless a column or a safe function (`abs`), and
# by identity when the caller's code holds one under another name (`run = exec`).
_BUILTIN_NAMES = frozenset(vars(builtins))
_BUILTIN_IDS = frozenset(id(v) for v in vars(builtins).values() if callable(v))

_OPERATORS = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.UAdd,
    ast.USub,
    ast.Not,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.And,
    ast.Or,
    ast.Load,
)
_NODES = (
    ast.Expression,
    ast.Name,
    ast.Constant,
    ast.Call,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.Attribute,
    ast.Tuple,
    ast.List,
) + _OPERATORS


def safe_environment(eval_env=None) -> patsy.EvalEnvironment:
    """The namespace formulas are evaluated in: eval_env's names (a dict or a patsy.EvalEnvironment, when given)
    before the safe functions, as patsy puts its own after the caller's; `Q`, `np` and `numpy` always mean
    patsy's Q (which backticks and keyword-named columns become) and the numpy functions above."""
    pinned = {"Q": patsy.builtins.Q, **{alias: _NUMPY_SUBSET for alias in _NUMPY_ALIASES}}
    if eval_env is None:
        return patsy.EvalEnvironment([pinned, SAFE_FUNCTIONS, FORMULA_CONSTANTS])
    if isinstance(eval_env, patsy.EvalEnvironment):
        return patsy.EvalEnvironment([pinned, eval_env.namespace, SAFE_FUNCTIONS, FORMULA_CONSTANTS], eval_env.flags)
    if isinstance(eval_env, dict):
        return patsy.EvalEnvironment([pinned, eval_env, SAFE_FUNCTIONS, FORMULA_CONSTANTS])
    raise FormulaError(f"eval_env must be a patsy.EvalEnvironment or a dict of names; got {type(eval_env).__name__}.")


def formula_environment(eval_env, reference: int = 1) -> patsy.EvalEnvironment:
    """The namespace of a Python front door, with eval_env read as patsy and statsmodels read it: None or 0,
    the caller's frame; an int n, n frames further up; -1 (statsmodels) or {}, the safe functions only; a dict
    or an EvalEnvironment as given. `reference`: frames from the function calling this one to the user's
    caller (1 when the public function calls it directly: the frame is captured there, at a fixed depth)."""
    if eval_env is None:
        eval_env = 0
    if isinstance(eval_env, int) and not isinstance(eval_env, bool):
        if eval_env == -1:
            return safe_environment()
        if eval_env < 0:
            raise FormulaError(
                f"eval_env={eval_env} is not a frame depth: pass 0 (the caller's names), a positive "
                "depth, -1 or {} (the allowed functions only), a dict or a patsy.EvalEnvironment."
            )
        try:
            eval_env = patsy.EvalEnvironment.capture(eval_env, reference=reference + 1)
        except ValueError:
            raise FormulaError(f"eval_env={eval_env}: the call stack is not that deep.") from None
    return safe_environment(eval_env)


# The functions that read their argument as np.asarray does: a column's Series or its numpy array give them the
# same values (mixedlm.patsy_data).
_ARRAY_FUNCTIONS = frozenset(NUMPY_FUNCTIONS) | {"I", "Q", "center", "standardize", "scale", "poly", "ns", "bs"}


def numpy_functions_only(name: str, env: patsy.EvalEnvironment) -> bool:
    """Whether `name`, a name of a formula that is not a column, means np/numpy (the pinned numpy subset) or one of
    the formula functions that read a column as an array, as SAFE_FUNCTIONS holds it (not a caller's own)."""
    if name in _NUMPY_ALIASES:
        return _lookup(env, name) is _NUMPY_SUBSET
    value = _lookup(env, name)
    if name in NUMPY_CONSTANTS and value is _MISSING or _is_formula_constant(name, value):
        return True  # (np.e's `e`: a formula that passed check_formula names no other `e` that is not a column)
    return name in _ARRAY_FUNCTIONS and value is SAFE_FUNCTIONS[name]


def used_environment(env: patsy.EvalEnvironment, formulas) -> patsy.EvalEnvironment:
    """The functions of `env` the formulas use, to keep with a fit: not the whole of the caller's namespace
    (patsy's designs keep such subsets too), and no values: formulas take values from the data only, so that
    predict's newdata without a column is an error, not a silent read of a caller's variable of that name."""
    names = {name for f in formulas for name in code_names(f)}
    namespace = env.namespace
    return env.subset(sorted(n for n in names if n in namespace and provides_code(n, namespace[n])))


def provides_code(name: str, value) -> bool:
    """Whether a name a formula reads from its environment is code (a function, numpy's np / numpy, or the formula
    language's constant pi), not a value: formulas take values from the data only. The one rule for the fit's
    check, the environment kept with a fit, and the columns predict's newdata must have."""
    return callable(value) or name in _NUMPY_ALIASES or _is_formula_constant(name, value)


def _is_formula_constant(name: str, value) -> bool:
    """R's constants as FORMULA_CONSTANTS holds them (or a caller's own of the same value: `from math import pi`)."""
    return (
        name in FORMULA_CONSTANTS and type(value) is type(FORMULA_CONSTANTS[name]) and value == FORMULA_CONSTANTS[name]
    )


def quoted_name(node: ast.AST) -> str | None:
    """The column an expression node quotes as Q("name") (how backticked and keyword-named columns reach patsy),
    or None for any other node."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Q"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return node.args[0].value
    return None


def check_formula(formula: str, columns, env: patsy.EvalEnvironment, role: str = "formula") -> patsy.ModelDesc:
    """Check every term of a patsy formula ('y ~ a + log(b)' or '~ 1 + x') without evaluating it; returns the
    formula as patsy is to evaluate it (`readable_formula`)."""
    desc = readable_formula(formula, columns, role)
    check_terms(term_codes(desc), columns, env, f"{role} {formula!r}")
    return desc


def term_codes(desc: patsy.ModelDesc) -> list[str]:
    """The code of every factor of every term of `desc`, both sides, in order."""
    return [factor.code for term in desc.lhs_termlist + desc.rhs_termlist for factor in term.factors]


def readable_formula(formula: str, columns, role: str = "formula") -> patsy.ModelDesc:
    """patsy's reading of `formula`, where a term that names a column by a Python keyword (`yield`, `class`,
    `True`; patsy would run it as Python syntax, or as the constant) or by R's dotted name (`IQ.verb`: to Python
    the attribute `verb` of `IQ`) is evaluated with `Q("yield")` in its place and keeps the name written:
    `log(yield)`, as lme4 names it."""
    try:
        desc = _model_desc(formula) if type(formula) is str else patsy.ModelDesc.from_formula(formula)
    except patsy.PatsyError as exc:
        raise FormulaError(f"cannot read {role} {formula!r}: {exc}") from None
    except (RecursionError, MemoryError):
        raise FormulaError(_too_deep(f"{role} {formula!r}")) from None
    keywords = _quoted_names(columns) if type(columns) is tuple else _quoted_names.__wrapped__(columns)
    if not keywords:
        return desc
    return _quoted_desc(desc, keywords) if type(formula) is str else _quoted_desc.__wrapped__(desc, keywords)


@functools.lru_cache(maxsize=256)  # a function of the labels alone (FrameColumns.names: a tuple)
def _quoted_names(columns) -> frozenset:
    """The column labels a formula must quote: Python keywords (`yield`) and R's dotted names (`IQ.verb`)."""
    return frozenset(str(c) for c in columns if keyword.iskeyword(str(c)) or is_dotted_name(str(c)))


@functools.lru_cache(maxsize=256)  # a function of the reading and the names alone (oats' `yield`: 50 us a design)
def _quoted_desc(desc: patsy.ModelDesc, keywords: frozenset) -> patsy.ModelDesc:
    """`desc` with keyword-named and dotted columns quoted (readable_formula)."""

    def term(t):
        return patsy.Term([_quoted_factor(f, keywords) for f in t.factors])

    return patsy.ModelDesc([term(t) for t in desc.lhs_termlist], [term(t) for t in desc.rhs_termlist])


# patsy's reading of a formula's text and Python's of a term's code are functions of the text alone (patsy's
# ModelDesc and Python's syntax trees are read, never changed): kept for the next fit of the same formula, 0.5 ms
# of a small model's design. What the names mean (columns, eval_env) is checked on every fit; an error is raised
# again every time (lru_cache keeps results only).
_model_desc = functools.lru_cache(maxsize=256)(patsy.ModelDesc.from_formula)


@functools.lru_cache(maxsize=1024)
def _term_nodes(code: str) -> tuple[ast.AST, ...]:
    """The nodes of a term's syntax tree (ast.walk's order), read once per text: what they mean is checked on every
    fit (_check_node), the walk itself is a function of the text."""
    return tuple(ast.walk(ast.parse(code, mode="eval")))


class _QuotedFactor(patsy.EvalFactor):
    """A term evaluated as `code` (with Q("...") for keyword-named columns) and named as written."""

    def __init__(self, code, written, origin=None):
        super().__init__(code, origin)
        self.written = written

    def name(self):
        return self.written


def _quoted_factor(factor, keywords):
    if not isinstance(factor, patsy.EvalFactor):
        return factor
    code, spans = factor.code, _keyword_spans(factor.code, keywords)
    if not spans:
        return factor
    for start, end in reversed(spans):
        code = code[:start] + "Q(" + json.dumps(code[start:end], ensure_ascii=False) + ")" + code[end:]
    return _QuotedFactor(code, factor.code, factor.origin)


def is_dotted_name(name: str) -> bool:
    """R's syntactic names with dots between Python identifiers (`IQ.verb`), which Python reads as an attribute."""
    parts = name.split(".")
    return len(parts) > 1 and all(part.isidentifier() for part in parts)


def _keyword_spans(code, keywords) -> list[tuple[int, int]]:
    """(start, end) of the names of a one-line term that are keyword-named or dotted columns: a keyword token, or
    the longest chain `a.b.c` of names and dots that is a column (not after a dot: `np.log` stays)."""
    tokens = _tokens(code)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        after_dot = i > 0 and tokens[i - 1].string == "."
        if t.type != tokenize.NAME or after_dot:
            i += 1
            continue
        end = i  # the longest chain name(.name)* from here that is a column
        best = i if t.string in keywords else None
        while end + 2 < len(tokens) and tokens[end + 1].string == "." and tokens[end + 2].type == tokenize.NAME:
            end += 2
            if code[t.start[1] : tokens[end].end[1]] in keywords:
                best = end
        if best is None:
            i += 1
            continue
        spans.append((t.start[1], tokens[best].end[1]))
        i = best + 1
    return spans


def check_terms(codes, columns, env: patsy.EvalEnvironment, where: str) -> None:
    columns = {str(c) for c in columns}
    for code in codes:
        try:
            nodes = _term_nodes(code.strip()) if type(code) is str else _term_nodes.__wrapped__(code.strip())
        except SyntaxError:
            raise FormulaError(_unreadable(code, columns, where)) from None
        except (RecursionError, MemoryError):
            raise FormulaError(_too_deep(where)) from None
        for node in nodes:
            _check_node(node, code, columns, env, where)


def _too_deep(where) -> str:
    return (
        f"{where[:200]}{'...' if len(where) > 200 else ''}: the formula is too long or too deeply nested for "
        "patsy's parser (it recurses once per operator: about 450 terms, or an expression of a few thousand "
        "operators, is its limit). Compute such columns before fitting, or combine them."
    )


def _constant_value(node) -> float | None:
    """The value of a numeric constant or of arithmetic on constants (in floating point, so never slow), else
    None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _constant_value(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.Mult, ast.Add, ast.Sub)):
        left, right = _constant_value(node.left), _constant_value(node.right)
        if left is None or right is None:
            return None
        try:
            with np.errstate(all="ignore"):
                return float(
                    {ast.Pow: np.power, ast.Mult: np.multiply, ast.Add: np.add, ast.Sub: np.subtract}[type(node.op)](
                        np.float64(left), np.float64(right)
                    )
                )
        except (OverflowError, ZeroDivisionError):
            return float("inf")
    return None


def _unreadable(code, columns, where) -> str:
    if code.strip() == ".":
        return (
            f"{where}: '.' (every other column, as R's lm reads it) is not expanded in mixed-model formulas; "
            "name the columns: y ~ a + b + (1 | g)."
        )
    words = [t.string for t in _tokens(code) if t.type == tokenize.NAME and keyword.iskeyword(t.string)]
    if words:
        close = difflib.get_close_matches(words[0], sorted(columns), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"{where}: cannot read the term {code!r}: {words[0]!r} is a Python keyword and not a column of "
            f"the data; a column of that name may be written bare.{hint}"
        )
    return (
        f"{where}: cannot read the term {code!r} as an expression; write a column whose name is not a "
        'Python name with backticks (`dose (mg)`) or as Q("dose (mg)").'
    )


def _tokens(code):
    try:
        return list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError):
        return []


@functools.lru_cache(maxsize=1024)  # a function of the text alone; Python's tokenizer costs ~10-50 us a formula
def code_names(code: str) -> tuple[str, ...]:
    """The names a formula's or a factor's code uses ("" for unreadable code, which no column or function has)."""
    try:
        return tuple(t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NAME)
    except (tokenize.TokenError, IndentationError):
        return ("",)


# Python computes an integer power exactly: 10**10**10 has ten billion digits and never finishes.
MAX_CONSTANT_EXPONENT = 10_000


def _check_node(node, code, columns, env, where):
    if not isinstance(node, _NODES):
        raise FormulaError(
            f"{where}: the term {code!r} uses Python syntax that formulas do not allow "
            f"({type(node).__name__}). {_ALLOWED}"
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        exponent = _constant_value(node.right)
        if exponent is not None and not abs(exponent) <= MAX_CONSTANT_EXPONENT:
            raise FormulaError(
                f"{where}: the term {code!r} raises to the power {ast.unparse(node.right)}, which "
                f"cannot be computed (exponents up to {MAX_CONSTANT_EXPONENT:,} are accepted)."
            )
    if isinstance(node, ast.Attribute):
        if not (
            isinstance(node.value, ast.Name)
            and node.value.id in _NUMPY_ALIASES
            and node.attr in NUMPY_FUNCTIONS + NUMPY_CONSTANTS
        ):
            raise FormulaError(
                f"{where}: the term {code!r} uses an attribute ({ast.unparse(node)}); only "
                f"np.<function> of the allowed numpy functions (and np.pi, np.e) is accepted (import another "
                f"function by name in your code: from scipy.special import expit). {_ALLOWED}"
            )
    elif isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in columns:
            raise FormulaError(f"{where}: the term {code!r} calls the column {node.func.id!r} as a function.")
        if not isinstance(node.func, (ast.Name, ast.Attribute)):
            raise FormulaError(
                f"{where}: the term {code!r} calls {ast.unparse(node.func)}, which is not an "
                f"allowed function. {_ALLOWED}"
            )
        if isinstance(node.func, ast.Name) and node.func.id == "Q":
            _check_quoted(node, code, columns, where)
    elif isinstance(node, ast.Name) and node.id not in columns:
        _check_name(node.id, code, columns, env, where)


def _check_quoted(node, code, columns, where):
    """patsy's Q looks its argument up in the caller's namespace too: here it names a column, nothing else."""
    arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        raise FormulaError(
            f"{where}: the term {code!r} calls Q with {ast.unparse(node)[2:-1]!r}; Q takes the "
            'name of a column as a string: Q("dose (mg)").'
        )
    if arg.value not in columns:
        close = difflib.get_close_matches(arg.value, sorted(columns), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FormulaError(f"{where} uses {arg.value!r}, which is not a column of the data.{hint}")


def _check_name(name, code, columns, env, where):
    """A name that is not a column: a function of the table or of eval_env, never one of Python's builtins."""
    if name.startswith("_"):
        raise FormulaError(
            f"{where}: the term {code!r} uses {name!r}; names starting with '_' are not allowed in formulas. {_ALLOWED}"
        )
    value = _lookup(env, name)
    if name in _BUILTIN_NAMES and value is not SAFE_FUNCTIONS.get(name) or id(value) in _BUILTIN_IDS:
        raise FormulaError(
            f"{where}: the term {code!r} uses {name!r}, which is not a column of the data and "
            f"is {'one of' if name in _BUILTIN_NAMES else 'held in the calling code as one of'} "
            f"Python's builtins; formulas do not call those. {_ALLOWED}"
        )
    if value is _MISSING:
        close = difflib.get_close_matches(name, sorted(columns), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" {_ALLOWED}"
        if name in NUMPY_CONSTANTS and not close:  # (`e`: numpy's, not R's)
            hint = f" For the constant, write np.{name} (as in sin(2*np.pi*Time)).{hint}"
        raise FormulaError(f"{where} uses {name!r}, which is not a column of the data nor an allowed function.{hint}")
    if not provides_code(name, value):
        hides = (
            f"; it hides the formula function {name}(), so rename it or pass eval_env={{}}"
            if name in SAFE_FUNCTIONS
            else f"; it hides the constant {name}, so rename it or pass eval_env={{}}"
            if name in FORMULA_CONSTANTS
            else "; formulas take values from the data's columns (add it as one)"
        )
        raise FormulaError(
            f"{where} uses {name!r}, which is not a column of the data; in the calling code it is a "
            f"{type(value).__name__}, not a function{hides}."
        )


_MISSING = object()


def _lookup(env, name):
    try:
        return env.namespace[name]
    except KeyError:
        return _MISSING


_ALLOWED = (
    "Formulas may use the data's columns, arithmetic, comparisons, these functions: "
    + ", ".join(sorted(SAFE_FUNCTIONS))
    + ", the constant pi, and in Python the functions of the calling code "
    "(docs/formulas.md)."
)
