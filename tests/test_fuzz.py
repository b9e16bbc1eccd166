"""Fuzz test (issue 14): random data frames, dtypes, formulas and arguments through every front door.

Every outcome must be a fit or a sparsemix error (a SparsemixError subclass, or MissingExtraError for a missing
optional dependency), never another library's exception; the command never exits 1 without printing a report,
never exits 3 (an internal error), and never changes its input file.

Reproducible by default (derandomize=True: the same examples in every run). SPARSEMIX_FUZZ=long runs many more
examples, with random (not derandomized) draws, for a search by hand:

    SPARSEMIX_FUZZ=long .venv/bin/python -m pytest -q -n 0 tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import subprocess
import sys
import traceback
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sparsemix
from sparsemix.cli import main as cli_main
from sparsemix.errors import MissingExtraError, SparsemixError

LONG = os.environ.get("SPARSEMIX_FUZZ", "") == "long"


def _settings(examples: int):
    return settings(
        max_examples=examples * 20 if LONG else examples,
        deadline=None,
        derandomize=not LONG,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


EXPECTED = (SparsemixError, MissingExtraError)

# Raw exceptions this test found in modules others were editing at the time, matched narrowly (type, module of
# the innermost sparsemix frame, message fragment) so that anything else still fails; SPARSEMIX_FUZZ_STRICT=1
# fails on these too. All found so far are fixed (newdata's column types, aliased backticked columns in
# predict, non-monotonic profiles, non-finite Hessians in the polish): the list is empty, kept for the next.
KNOWN_OPEN: list[tuple[str, str, str]] = []
STRICT = os.environ.get("SPARSEMIX_FUZZ_STRICT", "") == "1"


def _known_open(exc: BaseException) -> bool:
    if STRICT:
        return False
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}sparsemix{os.sep}" in f.filename]
    module = os.path.basename(frames[-1].filename) if frames else ""
    return any(type(exc).__name__ == kind and module == where and text in str(exc) for kind, where, text in KNOWN_OPEN)


# -- data frames ---------------------------------------------------------------------------------------------------

VALUE_KINDS = [
    "float",
    "float",
    "float",
    "float_nan",
    "float_inf",
    "int",
    "bool",
    "nullable_bool",
    "Int64",
    "Float64",
    "str",
    "categorical",
    "datetime",
    "datetime_tz",
    "timedelta",
    "period",
    "complex",
    "mixed",
    "constant",
    "huge",
    "tiny",
    "numeric_str",
    "all_nan",
    "float32",
    "float16",
    "uint8",
    "int8",
    "string",
    "arrow_float",
    "arrow_int",
    "arrow_string",
    "sparse",
    "all_none",
    "empty_str",
    "big_int",
]
GROUP_KINDS = [
    "int",
    "int",
    "str",
    "str",
    "float",
    "categorical",
    "bool",
    "mixed",
    "datetime",
    "Int64",
    "float_nan",
    "unsortable",
    "nullable_bool",
    "period",
    "string",
    "arrow_string",
    "uint8",
    "ordered",
    "empty_label",
]
COLUMNS = ("y", "x", "z", "w", "o")
GROUPS = ("g", "h")


def _objects(values) -> np.ndarray:
    """An object array of these values (np.array would make tuples a second dimension)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values if not any(isinstance(v, tuple) for v in values) else [None] * len(values)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _values(kind: str, n: int, rng: np.random.Generator):
    """A column of `n` values of one kind."""
    x = rng.normal(size=n)
    if kind == "float":
        return x
    if kind == "float_nan":
        return np.where(rng.random(n) < 0.2, np.nan, x)
    if kind == "float_inf":
        return np.where(rng.random(n) < 0.1, rng.choice([np.inf, -np.inf], n), x)
    if kind == "int":
        return rng.integers(-3, 4, n)
    if kind == "bool":
        return rng.random(n) < 0.5
    if kind == "nullable_bool":
        return pd.array(
            [None if r < 0.1 else bool(v) for r, v in zip(rng.random(n), rng.random(n) < 0.5)], dtype="boolean"
        )
    if kind == "Int64":
        return pd.array(
            [None if r < 0.1 else int(v) for r, v in zip(rng.random(n), rng.integers(0, 5, n))], dtype="Int64"
        )
    if kind == "Float64":
        return pd.array([None if r < 0.1 else float(v) for r, v in zip(rng.random(n), x)], dtype="Float64")
    if kind == "str":
        return np.array([f"s{v}" for v in rng.integers(0, 4, n)], dtype=object)
    if kind == "numeric_str":
        return np.array([f"{v:.3f}" for v in x], dtype=object)
    if kind == "categorical":
        return pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi", "unused"])
    if kind == "datetime":
        return pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 30, n), "D")
    if kind == "datetime_tz":
        return pd.Timestamp("2020-01-01", tz="Europe/Berlin") + pd.to_timedelta(rng.integers(0, 30, n), "h")
    if kind == "timedelta":
        return pd.to_timedelta(rng.integers(0, 100, n), "s")
    if kind == "period":
        return pd.period_range("2020-01", periods=max(n, 1), freq="M")[:n]
    if kind == "complex":
        return x + 1j * rng.normal(size=n)
    if kind == "mixed":
        pool = [1, "a", 2.5, None, True, (1, 2), b"x"]
        return _objects([pool[i] for i in rng.integers(0, len(pool), n)])
    if kind == "constant":
        return np.full(n, 4.0)
    if kind == "huge":
        return x * 1e200
    if kind == "tiny":
        return x * 1e-200
    if kind == "all_nan":
        return np.full(n, np.nan)
    if kind in ("float32", "float16"):
        return (x * 1e3).astype(kind)
    if kind in ("uint8", "int8"):
        return rng.integers(0, 100, n).astype(kind)
    if kind == "big_int":
        return rng.integers(2**62, 2**63 - 1, n, dtype=np.int64)
    if kind == "string":
        return pd.array(
            [None if r < 0.1 else f"s{v}" for r, v in zip(rng.random(n), rng.integers(0, 3, n))], dtype="string"
        )
    if kind.startswith("arrow_"):
        pa = pytest.importorskip("pyarrow")
        values = {
            "arrow_float": list(x),
            "arrow_int": [int(v) for v in rng.integers(0, 5, n)],
            "arrow_string": [f"a{v}" for v in rng.integers(0, 3, n)],
        }[kind]
        kind_pa = {"arrow_float": pa.float64(), "arrow_int": pa.int64(), "arrow_string": pa.string()}[kind]
        return pd.array([None if r < 0.1 else v for r, v in zip(rng.random(n), values)], dtype=pd.ArrowDtype(kind_pa))
    if kind == "sparse":
        return pd.arrays.SparseArray(np.where(rng.random(n) < 0.7, 0.0, x))
    if kind == "all_none":
        return _objects([None] * n)
    if kind == "empty_str":
        return _objects([""] * n)
    raise AssertionError(kind)


def _groups(kind: str, n: int, n_levels: int, rng: np.random.Generator):
    """A grouping column of `n` rows and (at most) `n_levels` levels."""
    codes = rng.integers(0, max(n_levels, 1), n)
    if kind == "int":
        return codes * 7 + 100
    if kind == "str":
        return np.array([f"L{c}" for c in codes], dtype=object)
    if kind == "float":
        return codes + 0.5
    if kind == "float_nan":
        return np.where(rng.random(n) < 0.1, np.nan, codes.astype(float))
    if kind == "categorical":
        return pd.Categorical([f"c{c}" for c in codes])
    if kind == "bool":
        return codes % 2 == 0
    if kind == "mixed":
        return np.array([c if c % 2 else f"{c}" for c in codes], dtype=object)
    if kind == "unsortable":
        return _objects([(c,) if c % 2 else float(c) for c in codes])
    if kind == "datetime":
        return pd.Timestamp("2021-06-01") + pd.to_timedelta(codes, "D")
    if kind == "Int64":
        return pd.array([None if r < 0.05 else int(c) for r, c in zip(rng.random(n), codes)], dtype="Int64")
    if kind == "nullable_bool":
        return pd.array([bool(c % 2) for c in codes], dtype="boolean")
    if kind == "string":
        return pd.array([f"L{c}" for c in codes], dtype="string")
    if kind == "arrow_string":
        pa = pytest.importorskip("pyarrow")
        return pd.array([f"L{c}" for c in codes], dtype=pd.ArrowDtype(pa.string()))
    if kind == "uint8":
        return (codes % 256).astype(np.uint8)
    if kind == "ordered":
        return pd.Categorical(
            [f"o{c}" for c in codes], categories=[f"o{c}" for c in range(max(n_levels, 1))][::-1], ordered=True
        )
    if kind == "empty_label":
        return _objects(["" if c == 0 else f"L{c}" for c in codes])
    if kind == "period":
        return (
            pd.PeriodIndex([pd.Period("2020-01", "M") + int(c) for c in codes]) if n else pd.PeriodIndex([], freq="M")
        )
    raise AssertionError(kind)


def _mostly(draw, good, bad, odds: int = 4):
    """`good` (drawn from a strategy or a value) except one time in `odds`, then one of `bad`: most examples
    are hostile in one or two ways only, so that they reach the fit and the results."""
    if draw(st.integers(0, odds - 1)) == 0:
        return draw(st.sampled_from(bad))
    return draw(good) if isinstance(good, st.SearchStrategy) else good


@st.composite
def frames(draw, max_rows: int = 60):
    """A frame of 0..max_rows rows: columns y, x, z, w, o of drawn kinds (one may be missing), grouping
    columns g and h of drawn kinds and level counts; sometimes a duplicated column name."""
    n = _mostly(draw, st.integers(min(12, max_rows), max_rows), list(range(0, min(12, max_rows) + 1)), odds=5)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cols = {}
    for name in COLUMNS:
        cols[name] = _values(_mostly(draw, "float", VALUE_KINDS, odds=6), n, rng)
    if isinstance(cols["w"], np.ndarray) and cols["w"].dtype.kind == "f":
        cols["w"] = np.abs(cols["w"]) + draw(st.sampled_from([0.0, 0.5, 1.0, 1.0]))  # mostly usable weights
    for name in GROUPS:
        kind = _mostly(draw, st.sampled_from(["int", "str"]), GROUP_KINDS, odds=3)
        n_levels = _mostly(draw, st.integers(2, 8), [1, max(n, 1), max(n // 2, 1), 12, 30], odds=4)
        cols[name] = _groups(kind, n, n_levels, rng)
    data = pd.DataFrame(cols)
    if n and draw(st.integers(0, 4)) > 0:  # a response with signal, so that fits often succeed
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = pd.factorize(data["g"].astype(str))[0]
                x = pd.to_numeric(data["x"], errors="coerce").astype(float).to_numpy()
            effects = rng.normal(size=max(g.max() + 1, 1))  # (every label missing: codes all -1)
            data["y"] = np.nan_to_num(x) + effects[g] + rng.normal(size=n)
        except (TypeError, ValueError):
            pass
    drop = _mostly(draw, st.none(), list(COLUMNS + GROUPS), odds=8)
    if drop is not None:
        data = data.drop(columns=drop)
    if draw(st.integers(0, 19)) == 0 and data.shape[1] >= 2:
        data.columns = [data.columns[1]] + list(data.columns[1:])  # a duplicated name
    return data


# -- formulas ------------------------------------------------------------------------------------------------------

NAMES = ["x", "z", "w", "o", "g", "h", "nope", "`x`", "y"]
FIXED_ATOMS = NAMES + [
    "x:z",
    "x*z",
    "x:g",
    "I(x**2)",
    "I(x*2 + 1)",
    "log(x)",
    "np.exp(z)",
    "C(g)",
    "C(z)",
    "C(x)",
    "x + x",
    "scale(x)",
    "center(z)",
    "I(10**10**10)",
    "Q('x')",
    "np.log(o)",
    "sqrt(w)",
    "poly(x)",
    'f"{x}"',
    "x**2",
    "(x + z)**2",
    "-1",
    "0",
    "1",
    "z:C(h)",
]
RANDOM_TERMS = [
    "(1|g/h/g)",
    "(x + I(x**2) | g)",
    "(1 | g:nope)",
    "(log(w)|g)",
    "(1|g)",
    "(1|h)",
    "(x|g)",
    "(1|g:h)",
    "(0+x|g)",
    "(x||g)",
    "(1|g/h)",
    "(1+z|h)",
    "(z||h)",
    "(1|nope)",
    "(x|)",
    "(|g)",
    "(1|x)",
    "(0|g)",
    "(1|g) + (1|g)",
    "(1 + x + z | g)",
    "(-1 + x | g)",
    "(C(z)|g)",
    "(1|g:h:g)",
    "(1|C(g))",
]
RESPONSES = ["y", "y", "y", "log(y)", "x", "z", "nope", "I(y*2)", "g", "cbind(y, x)", "np.exp(y)"]
BROKEN = [
    "",
    "~",
    "y ~",
    "y ~ x +",
    "~ x + (1|g)",
    "y ~ (1|g",
    "y ~ x + (1|g))",
    "y ~ x | g",
    "y ~~ x",
    "y ~ x + (1||)",
    "y ~ x + ((1|g))",
    "y ~ 1 + (1|g) + (1|g)",
    "y ~ x + (1 | g | h)",
    "y ~ x + []",
    "y ~ x + 'g'",
    "y ~ x + (1|g) +",
    "y ~ x + (1 | g) ~ z",
    "y ~ __import__('os') + (1|g)",
    "y ~ x.real + (1|g)",
    "y ~ lambda: 1 + (1|g)",
    "y ~ x + (1|g);",
    "y ~ x\n+ (1|g)",
]


GOOD_FIXED = ["x", "z", "x:z", "x*z", "I(x**2)", "C(h)", "np.exp(z)", "1", "0 + x"]
GOOD_RANDOM = ["(1|g)", "(x|g)", "(1|g:h)", "(0+x|g)", "(x||g)", "(1|g/h)", "(1|h)", "(1|g) + (1|h)"]


@st.composite
def lme4_formulas(draw):
    if draw(st.integers(0, 11)) == 0:
        return draw(st.sampled_from(BROKEN))
    response = _mostly(draw, "y", RESPONSES, odds=6)
    fixed = draw(st.lists(st.sampled_from(_mostly(draw, GOOD_FIXED, [FIXED_ATOMS], odds=3)), max_size=3))
    random = [draw(st.sampled_from(GOOD_RANDOM))] if draw(st.integers(0, 5)) else []
    random += draw(st.lists(st.sampled_from(RANDOM_TERMS), max_size=2)) if draw(st.integers(0, 2)) == 0 else []
    terms = fixed + random
    rhs = " + ".join(terms) if terms else draw(st.sampled_from(["1", "0", "-1"]))
    return f"{response} ~ {rhs}"


# -- arguments -----------------------------------------------------------------------------------------------------

HOSTILE = [None, "no", "False", 0, 1, 2.5, np.nan, [True], {}, np.float64(1.0)]
BOOLS = st.sampled_from([True, False, np.True_, np.False_] * 3 + HOSTILE)


def _column_or_array_values(n_rows):
    return st.one_of(
        st.none(),
        st.sampled_from(["w", "o", "x", "g", "nope", "y"]),
        st.integers(0, 3).map(lambda k: np.ones(n_rows + k - 1 if n_rows + k > 0 else 0)),
        st.just(np.full(n_rows, np.nan)),
        st.just(np.arange(n_rows, dtype=float) - 1.0),
        st.just(np.array(["a"] * n_rows, dtype=object)),
        st.just(3.0),
        st.just([1.0] * n_rows),
    )


STARTS = st.one_of(
    st.none(),
    st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, np.nan, np.inf, 1e12, 2.0]), max_size=4),
    st.sampled_from(["abc", 1.0, [[1.0]], {"a": 1}, np.ones((2, 2)), ["1"]]),
)
MAXITER = st.sampled_from(
    [10_000, 1, 2, 5, 0, -1, 2.5, "10", 1e4, np.int64(50), True, None, float("nan"), float("inf"), 10**30]
)
OPTIMIZER = st.sampled_from(["auto", "auto", "bobyqa", "lbfgs", "powell", "nm", "bogus", None, 3])


# -- the test's machinery -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def _expected_or_raise(call):
    """Run call(); a sparsemix error gives None, another exception propagates (the test fails)."""
    try:
        result = call()
    except EXPECTED as exc:
        event(f"{getattr(call, '__name__', '')}: {type(exc).__name__}: {str(exc)[:50]}")
        return None
    except Exception as exc:
        if not _known_open(exc):
            raise
        event(f"known open: {type(exc).__name__}: {str(exc)[:50]}")
        return None
    event(f"{getattr(call, '__name__', '')}: ok")
    return result


def _exercise_lmer_results(fit, data, newdata, draw):
    assert np.isfinite(fit.llf) or np.isnan(fit.llf)
    str(fit.summary())
    repr(fit)
    fit.fixed_effects()
    fit.variance_components()
    fit.ranef()
    fit.predict()
    _expected_or_raise(lambda: fit.predict(newdata))
    _expected_or_raise(lambda: fit.predict(data, include_random=draw(st.booleans())))
    _expected_or_raise(
        lambda: fit.predict(
            newdata,
            allow_new_levels=draw(st.booleans()),
            offset=draw(st.sampled_from([None, "o", "nope", 1.0, np.ones(3)])),
        )
    )
    _expected_or_raise(
        lambda: fit.simulate(
            draw(st.sampled_from([1, 2, 0, -1, 1.5, "2"])), seed=draw(st.sampled_from([0, None, -3, "s"]))
        )
    )
    _expected_or_raise(lambda: fit.confint(method="wald", level=draw(st.sampled_from([0.95, 0.5, 1.5, 0, 95]))))
    if draw(st.integers(0, 7)) == 0:  # profiles cost dozens of refits: now and then
        _expected_or_raise(lambda: fit.confint(method="profile"))
    again = pickle.loads(pickle.dumps(fit))
    np.testing.assert_array_equal(np.asarray(again.predict()), np.asarray(fit.predict()))
    np.testing.assert_array_equal(np.asarray(again.fe_params), np.asarray(fit.fe_params))


# -- sparsemix.lmer --------------------------------------------------------------------------------------------------


@_settings(300)
@given(data=frames(), formula=lme4_formulas(), args=st.data())
def test_lmer_fits_or_raises_a_sparsemix_error(data, formula, args):
    n = len(data)
    kwargs = {}
    if args.draw(st.integers(0, 3)) == 0:
        kwargs["reml"] = args.draw(BOOLS)
    if args.draw(st.integers(0, 5)) == 0:
        kwargs["weights"] = args.draw(_column_or_array_values(n))
    if args.draw(st.integers(0, 5)) == 0:
        kwargs["offset"] = args.draw(_column_or_array_values(n))
    if args.draw(st.integers(0, 5)) == 0:
        kwargs["start"] = args.draw(STARTS)
    if args.draw(st.integers(0, 5)) == 0:
        kwargs["maxiter"] = args.draw(MAXITER)
    if args.draw(st.integers(0, 4)) == 0:
        kwargs["optimizer"] = args.draw(OPTIMIZER)
    if args.draw(st.integers(0, 39)) == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # to_dict of duplicated names
            data = args.draw(st.sampled_from([None, data.to_dict("list"), data.to_numpy(), data.get("y"), "d.csv"]))
    if args.draw(st.integers(0, 29)) == 0:
        formula = args.draw(st.sampled_from([None, 3, b"y ~ x + (1|g)", ["y ~ x + (1|g)"]]))
    before = data.copy(deep=True) if isinstance(data, pd.DataFrame) else None
    with _quiet():
        fit = _expected_or_raise(lambda: sparsemix.lmer(formula, data, eval_env={}, **kwargs))
        if before is not None:
            pd.testing.assert_frame_equal(data, before)  # the caller's frame is not modified
        if fit is not None:
            _exercise_lmer_results(fit, data, args.draw(frames(max_rows=10)), args.draw)


# -- statsmodels' MixedLM.from_formula(...).fit() -------------------------------------------------------------------

SM_FIXED = [
    "y ~ x",
    "y ~ 1",
    "y ~ x + z",
    "y ~ x * z",
    "y ~ C(g)",
    "y ~ C(z)",
    "y ~ C(x) + z",
    "y ~ nope",
    "y ~ log(x)",
    "y ~ I(x**2)",
    "y ~ x + C(z)",
    "y ~",
    "~ x",
    "y ~ x + (1|g)",
    "z ~ y",
    "y ~ 0",
    "g ~ x",
    'y ~ f"{x}"',
]
SM_RE = [None, None, "1", "~1", "1 + x", "0 + x", "~ z", "x", "nope", "1 + C(h)", "(1|g)", ""]
SM_VC = [
    None,
    None,
    {"h": "0 + C(h)"},
    {"h": "0 + C(h)", "x": "0 + x"},
    {"v": "0 + nope"},
    {"h": "C(h)"},
    {"h": 3},
    {},
    {"h": ""},
    "0 + C(h)",
    {"h": "0 + C(h)", 1: "0 + z"},
]
SM_GROUPS = ["g", "g", "h", "ones", "nope", None, "array", "short", 3]


@_settings(250)
@given(data=frames(), args=st.data())
def test_statsmodels_door_fits_or_raises_a_sparsemix_error(data, args):
    n = len(data)
    formula = _mostly(args.draw, st.sampled_from(SM_FIXED[:4]), SM_FIXED, odds=3)
    kwargs = {
        "re_formula": _mostly(args.draw, st.sampled_from(SM_RE[:7]), SM_RE, odds=4),
        "vc_formula": _mostly(args.draw, st.sampled_from(SM_VC[:4]), SM_VC, odds=4),
    }
    groups = _mostly(args.draw, st.sampled_from(SM_GROUPS[:4]), SM_GROUPS, odds=4)
    kwargs["groups"] = (
        {"ones": np.ones(n), "array": np.arange(n) % 3, "short": np.ones(max(n - 1, 0))}.get(groups, groups)
        if isinstance(groups, str)
        else groups
    )
    if args.draw(st.integers(0, 3)) == 0:
        kwargs["missing"] = args.draw(st.sampled_from(["drop", "raise", "none", "bogus", None]))
    fit_kwargs = {}
    if args.draw(st.integers(0, 3)) == 0:
        fit_kwargs["reml"] = args.draw(BOOLS)
    if args.draw(st.integers(0, 3)) == 0:
        fit_kwargs["method"] = args.draw(OPTIMIZER)
    if args.draw(st.integers(0, 3)) == 0:
        fit_kwargs["maxiter"] = args.draw(MAXITER)
    before = data.copy(deep=True)
    with _quiet():

        def run():
            model = sparsemix.MixedLM.from_formula(formula, data, eval_env={}, **kwargs)
            return model.fit(**fit_kwargs)

        res = _expected_or_raise(run)
        pd.testing.assert_frame_equal(data, before)
        if res is not None:
            str(res.summary())
            res.params, res.bse, res.random_effects  # noqa: B018 (attributes that compute)
            _expected_or_raise(lambda: res.predict(args.draw(frames(max_rows=10))))
            again = pickle.loads(pickle.dumps(res))
            np.testing.assert_array_equal(np.asarray(again.params), np.asarray(res.params))


# -- the command ------------------------------------------------------------------------------------------------------


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli_argv(args, path, n_formulas):
    command = "anova" if n_formulas > 1 else "fit"
    argv = [command, str(path)]
    for _ in range(n_formulas):
        plain = args.draw(
            st.sampled_from(["y ~ x + (1|g)", "y ~ 1 + (1|g)", "y ~ x + (x||g)", "y ~ x + (1|g) + (1|h)"])
        )
        argv += ["--formula", plain if args.draw(st.booleans()) else args.draw(lme4_formulas())]
    if args.draw(st.booleans()):
        argv.append("--ml")
    if command == "fit" and args.draw(st.integers(0, 4)) == 0:
        argv += ["--weights", args.draw(st.sampled_from(["w", "x", "nope", "g"]))]
    if command == "fit" and args.draw(st.integers(0, 4)) == 0:
        argv += ["--offset", args.draw(st.sampled_from(["o", "x", "nope", "g"]))]
    if args.draw(st.integers(0, 4)) == 0:
        argv += ["--maxiter", args.draw(st.sampled_from(["1", "3", "100", "1", "3", "0", "-1", "ten", "1e4"]))]
    if args.draw(st.integers(0, 5)) == 0:
        argv += ["--sep", args.draw(st.sampled_from([",", ";", "tab", ";;", "|"]))]
    argv += ["--format", args.draw(st.sampled_from(["text", "json", "markdown"])), "--quiet"]
    if args.draw(st.integers(0, 5)) == 0:
        argv += [
            "--output",
            args.draw(st.sampled_from(["report.txt", "report.txt", str(path), "./" + os.path.basename(path)])),
        ]
    return argv


def _write_input(data, path, how):
    if how == "csv":
        data.to_csv(path, index=False)
    elif how == "semicolons":
        data.to_csv(path, index=False, sep=";")
    elif how == "latin1":
        data.assign(**{str(data.columns[0]) if data.shape[1] else "c": "é"}).to_csv(
            path, index=False, encoding="latin-1"
        )
    elif how == "empty":
        open(path, "w").close()
    elif how == "header":
        data.iloc[:0].to_csv(path, index=False)
    elif how == "garbage":
        open(path, "wb").write(b'y,x,g\n1,"2,3\n\x00\xff\xfe,,\n')


INPUTS = st.sampled_from(["csv"] * 8 + ["semicolons", "latin1", "empty", "header", "garbage"])


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _check_cli_outcome(code, out, err, argv, report_path):
    assert code in (0, 1, 2), f"exit {code} for {argv}:\n{err}"
    if code in (0, 1):
        report = out if report_path is None or not os.path.exists(report_path) else open(report_path).read()
        assert report.strip(), f"exit {code} without a report for {argv}:\n{err}"
    if code == 2:
        assert err.strip(), f"exit 2 without a message for {argv}"


@_settings(250)
@given(data=frames(), args=st.data())
def test_cli_exits_0_1_or_2_and_never_touches_its_input(data, args, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / _mostly(args.draw, "data.csv", ["data.tsv", "data.txt", "data.CSV"], odds=6)
    _write_input(data, path, args.draw(INPUTS))
    digest = _sha(path)
    n_formulas = args.draw(st.sampled_from([1, 1, 1, 2, 3]))
    argv = _cli_argv(args, path, n_formulas)
    cwd = os.getcwd()
    os.chdir(folder)  # --output report.txt and ./data.csv land in the temporary folder
    try:
        with _quiet():
            code, out, err = _run_cli(argv)
    finally:
        os.chdir(cwd)
    event(f"cli exit {code}" + (f": {err.strip().replace(str(folder), '')[:60]}" if code == 2 else ""))
    report = None
    if "--output" in argv:
        report = str(folder / argv[argv.index("--output") + 1])
    _check_cli_outcome(code, out, err, argv, report)
    assert _sha(path) == digest, f"the input file changed: {argv}"


# A handful of real processes: the installed entry point, standard input, and the exit code as the shell sees it.
SUBPROCESS_CASES = [
    (["fit", "{path}", "--formula", "y ~ x + (1|g)"], "csv"),
    (["fit", "-", "--formula", "y ~ x + (x||g) + (1|h)", "--format", "json"], "stdin"),
    (["fit", "{path}", "--formula", "y ~ x + (1|g)", "--output", "{path}"], "csv"),
    (["fit", "{path}", "--formula", "y ~ nope + (1|g)"], "csv"),
    (["fit", "{path}", "--formula", "y ~ x + (1|g)", "--maxiter", "1"], "csv"),
    (["anova", "{path}", "--formula", "y ~ 1 + (1|g)", "--formula", "y ~ x + (1|g)"], "csv"),
    (["fit", "{path}", "--formula", "y ~ x + (1|g)"], "semicolons"),
    (["fit", "-", "--formula", "y ~ x + (1|g)"], "latin1"),
]


@pytest.mark.parametrize("argv, how", SUBPROCESS_CASES)
def test_cli_subprocess(argv, how, tmp_path):
    rng = np.random.default_rng(len(argv))
    n = 50
    g, h, x = rng.integers(0, 6, n), rng.integers(0, 4, n), rng.normal(size=n)
    data = pd.DataFrame(
        {
            "y": x + rng.normal(size=6)[g] + rng.normal(size=n),
            "x": x,
            "g": g,
            "h": h,
            "w": rng.uniform(0.5, 2, n),
            "o": rng.normal(size=n),
        }
    )
    path = tmp_path / "data.csv"
    _write_input(data, path, "csv" if how == "stdin" else how)
    digest = _sha(path)
    argv = [a.replace("{path}", str(path)) for a in argv]
    stdin = open(path, "rb").read() if "-" in argv else None
    proc = subprocess.run(
        [sys.executable, "-m", "sparsemix", *argv], input=stdin, capture_output=True, timeout=120, cwd=tmp_path
    )
    report = str(path) if "--output" in argv else None
    _check_cli_outcome(
        proc.returncode, proc.stdout.decode(), proc.stderr.decode(), argv, report if proc.returncode in (0, 1) else None
    )
    assert _sha(path) == digest
