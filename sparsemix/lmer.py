"""`sparsemix.lmer(formula, data)`: lme4's formula language on the sparse engine.

This module turns a formula and a data frame into the engine's inputs (X, y, random-effect terms, prior
weights, offset), fits, and returns `LmerResults`. It keeps what later stages need (the design, the
deviance function) so that results can refit by ML, profile and bootstrap without touching the data again.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy

from . import checks
from .engine import PenalizedSystem
from .errors import FormulaError, InputError, SparsemixWarning
from .fitting import build_fit, build_system, optimize_system, warn_if_singular
from .pilot import pilot_start, pilot_wanted
from .formula.lme4 import RandomSpec, parse_formula
from .formula.safety import check_formula, formula_environment, safe_environment, used_environment
from .formula.mixedlm import factor_codes, fixed_design, formula_columns, indicator_variable, level_name
from .optimize import DEFAULT_OPTIMIZER, resolve_method
from .progress import ProgressPrinter
from .terms import CovarianceTemplate, RandomTerm, indicator_matrix, sorted_codes

__all__ = ["lmer", "LmerDesign", "RankDeficiencyWarning"]


class RankDeficiencyWarning(SparsemixWarning):
    """Fixed-effect columns were dropped because they are linear combinations of the others (as lme4)."""


@dataclass(frozen=True)
class TermInfo:
    """What a fitted random-effect term needs to be described and to predict for new data."""

    spec: RandomSpec
    grp: str                          # VarCorr's group name (made unique: "Subject", "Subject.1")
    columns: tuple[str, ...]
    levels: tuple                     # level labels in code order
    design_info: object = field(repr=False)   # patsy design of the columns, None for a sparse indicator
    indicator: str | None = None      # the factor of a sparse indicator term


@dataclass(frozen=True)
class LmerDesign:
    formula: str
    data_name: str
    y: np.ndarray
    X: np.ndarray
    fe_names: tuple[str, ...]
    fixed_info: object = field(repr=False)
    terms: tuple[RandomTerm, ...] = field(repr=False)
    term_info: tuple[TermInfo, ...] = field(repr=False)
    weights: np.ndarray | None = field(repr=False)
    offset: np.ndarray = field(repr=False)
    row_index: pd.Index = field(repr=False)
    n_dropped: int
    dropped_columns: tuple[str, ...]
    eval_env: object = field(repr=False)

    @property
    def nobs(self) -> int:
        return self.y.shape[0]

    def system(self) -> PenalizedSystem:
        return build_system(self.X, self.y - self.offset, list(self.terms), weights=self.weights)


def lmer(formula: str, data: pd.DataFrame, reml: bool = True, weights=None, offset=None, start=None,
         optimizer: str = DEFAULT_OPTIMIZER, maxiter: int = 10_000, progress=None, verbose: bool = False,
         eval_env=None):
    """Fit a linear mixed model written in lme4's formula language.

    weights: prior weights (a column name or an array), as lme4's `weights`: residual variance sigma^2 / w.
    offset: a column name or an array added to the linear predictor.
    Rows with missing values in any variable the model uses are dropped (lme4's na.omit); see `n_dropped`.
    verbose: print the optimizer's progress (evaluations, deviance, elapsed) to standard error, at most once a
    second; `progress` takes any callable(evaluation, deviance, seconds) instead. The log is kept either way
    (`results.fit_log`).
    eval_env: where the functions a formula calls besides the fixed list come from (docs/formulas.md): by
    default the caller's namespace, as patsy's eval_env=0; {} for the fixed list only.
    """
    from .lmer_results import LmerResults   # results import this module's design types

    checks.check_progress(progress)
    reml = checks.check_bool(reml, "reml")
    verbose = checks.check_bool(verbose, "verbose")
    maxiter = checks.check_count(maxiter, "maxiter")
    if verbose and progress is None:
        progress = ProgressPrinter()
    if not isinstance(data, pd.DataFrame):          # (importing partitioned.py costs a pandas frame 8 ms)
        from .partitioned import fit_partitioned, is_dask_frame
        if is_dask_frame(data):       # rows on a cluster: only level sets and cross-products come here
            caller = formula_environment(None) if eval_env is None else None
            return fit_partitioned(formula, data, reml=reml, weights=weights, offset=offset, start=start,
                                   optimizer=optimizer, maxiter=maxiter, progress=progress, eval_env=eval_env,
                                   caller_env=caller)
    env = formula_environment(eval_env)      # the caller's functions, checked in formula/safety.py
    design = build_design(formula, data, weights=weights, offset=offset, eval_env=env)
    method = resolve_method(optimizer)
    if start is not None:   # before any optimizer: a NaN start once reached nlopt and corrupted memory
        start = checks.check_start(start, _theta_lower_bounds(design.terms), "start", _theta_names(design),
                                   limit=checks.START_LIMIT)
    system = design.system()
    step = None
    if pilot_wanted(start, method):
        start, step = pilot_start(system, design.X, design.y - design.offset, list(design.terms), design.weights,
                                  reml) or (None, None)
    opt = optimize_system(system, reml=reml, start_theta=start, method=method, maxiter=maxiter,
                          progress=progress, initial_step=step)
    fit = build_fit(system, opt, reml)
    checks.check_residual_variance(fit.sigma2, design.nobs)
    results = LmerResults(design, fit)
    warn_if_singular(fit, results.theta_names)
    return results


def _theta_lower_bounds(terms) -> np.ndarray:
    """theta's bounds as RelativeCovariance.lower_bounds, from the terms alone (before the system is built)."""
    return np.concatenate([[0.0 if i == j else -np.inf for i, j in t.template.positions] for t in terms])


def _theta_names(design: "LmerDesign") -> list[str]:
    """LmerResults.theta_names, from the design."""
    return [f"{info.spec.group_name}.{info.columns[i]}" if i == j else
            f"{info.spec.group_name}.{info.columns[i]}.{info.columns[j]}"
            for info, term in zip(design.term_info, design.terms) for i, j in term.template.positions]


def build_design(formula, data, weights=None, offset=None, eval_env=None) -> LmerDesign:
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
    parsed = parse_formula(formula)
    env = eval_env if eval_env is not None else safe_environment()
    used = formula_columns([parsed.fixed] + [s.expr for s in parsed.random], data.columns)
    for spec in parsed.random:
        checks.require_columns(data, spec.group, f"grouping factor of {spec.source}")
        used += [g for g in spec.group if g not in used]
    formulas = [parsed.fixed] + [s.expr for s in parsed.random]
    data = checks.check_column_types(data, formula_columns(formulas, data.columns),
                                     [g for s in parsed.random for g in s.group], formulas,
                                     [v for v in (weights, offset) if isinstance(v, str) and v in data.columns])
    w = _column_or_array(data, weights, "weights")
    off = _column_or_array(data, offset, "offset")
    keep = np.array(data[used].notna().all(axis=1)) if used else np.ones(len(data), bool)
    for arr in (w, off):
        if arr is not None:
            keep &= np.isfinite(arr)
    n_dropped = int((~keep).sum())
    frame = data.loc[keep]
    checks.check_not_empty(len(frame), "data" if n_dropped == 0 else "data after dropping incomplete rows")
    w = None if w is None else w[keep]
    off = np.zeros(len(frame)) if off is None else off[keep]
    if w is not None and np.any(w <= 0):
        raise InputError("weights must be positive; drop the rows with zero weight or fix the weights column.")
    if w is not None:
        checks.check_weights_scale(w)

    if parsed.response in frame.columns:       # before patsy, which would expand a text column into indicators
        checks.require_numeric_column(frame[parsed.response], f"response {parsed.response!r}")
    endog, exog, fixed_info = fixed_design(parsed.fixed, _strings_as_categories(frame, parsed.fixed), env)
    y = checks.as_numeric_vector(endog.to_numpy(), "response")
    checks.check_finite(y, f"response {parsed.response!r}", missing_hint=False)
    checks.check_response_varies(y, parsed.response)
    X = exog.to_numpy(dtype=float)
    checks.check_finite(X, "fixed-effects design", missing_hint=False)
    names = [_lme4_name(c) for c in exog.columns]
    X, names, dropped = _drop_aliased(X, names)
    checks.check_fixed_columns_vs_nobs(X.shape[1], len(y), names)

    infos, terms = [], []
    for spec in parsed.random:
        term, info = _random_term(spec, frame, env)
        checks.check_nobs_vs_n_random_effects(term.n_levels * term.k, len(frame), spec.source)
        terms.append(term)
        infos.append(info)
    order = sorted(range(len(terms)), key=lambda i: -terms[i].n_levels)   # lme4: most levels first (stable)
    terms = [terms[i] for i in order]
    infos = _unique_group_names([infos[i] for i in order])
    if not terms:
        raise FormulaError(f"{formula!r} has no random-effects term; add one such as '(1 | g)'.")
    return LmerDesign(formula, getattr(data, "name", "data"), y, X, tuple(names), fixed_info, tuple(terms),
                      tuple(infos), w, off, frame.index, n_dropped, tuple(dropped),
                      used_environment(env, [parsed.fixed] + [s.expr for s in parsed.random]))


def _strings_as_categories(frame: pd.DataFrame, fixed: str) -> pd.DataFrame:
    """Text columns of the fixed part as pandas Categoricals with their sorted levels, which is what patsy makes
    of them: patsy then reads the codes instead of sniffing every value in Python (InstEval's `service`: 0.4 s
    of a 2.2 s fit)."""
    text = [c for c in formula_columns([fixed], frame.columns)      # object dtype, or pandas 3's str dtype
            if (frame[c].dtype == object or isinstance(frame[c].dtype, pd.StringDtype))
            and pd.api.types.infer_dtype(frame[c], skipna=False) == "string"]
    return frame.assign(**{c: pd.Categorical(frame[c]) for c in text}) if text else frame


def _column_or_array(data, value, role):
    if value is None:
        return None
    if isinstance(value, str):
        checks.require_columns(data, [value], role)
        value = data[value].to_numpy()
    arr = checks.as_numeric_vector(value, role)
    checks.check_length(arr, len(data), role, reference="data")
    return arr


def _lme4_name(name: str) -> str:
    """patsy's column name as R writes it: (Intercept), and for Q("my x") the name, in backticks where R
    needs them (`my x`, `if`; yield for Q("yield"))."""
    if name == "Intercept":
        return "(Intercept)"
    return re.sub(r'Q\("((?:[^"\\]|\\.)*)"\)', lambda m: _r_name(json.loads('"' + m.group(1) + '"')), name)


# R's syntactic names: a letter, or a dot not followed by a digit, then letters, digits, dots and underscores;
# not a reserved word (?Reserved).
_R_SYNTACTIC = re.compile(r"(?:[^\W\d_]|\.(?!\d))[\w.]*")
_R_RESERVED = frozenset("if else repeat while function for in next break TRUE FALSE NULL Inf NaN NA NA_integer_ "
                        "NA_real_ NA_character_ NA_complex_ ...".split())


def _r_name(name: str) -> str:
    syntactic = _R_SYNTACTIC.fullmatch(name) and name not in _R_RESERVED and not re.fullmatch(r"\.\.\d+", name)
    return name if syntactic else "`" + name + "`"


def _drop_aliased(X, names):
    """lme4: drop fixed-effect columns that are linear combinations of earlier ones, and say which."""
    if X.shape[1] == 0:
        return X, names, []
    norms = np.linalg.norm(X, axis=0)
    keep, basis = [], np.zeros((X.shape[0], 0))
    for j in range(X.shape[1]):
        if norms[j] == 0:
            continue
        col = X[:, j] / norms[j]
        resid = col - basis @ (basis.T @ col) if basis.shape[1] else col
        if np.linalg.norm(resid) > 1e-7:
            keep.append(j)
            basis = np.column_stack([basis, resid / np.linalg.norm(resid)])
    dropped = [names[j] for j in range(X.shape[1]) if j not in keep]
    if dropped:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): "
                      f"{', '.join(dropped)}", RankDeficiencyWarning, stacklevel=4)
    return X[:, keep], [names[j] for j in keep], dropped


def group_codes(frame: pd.DataFrame, group: tuple[str, ...], check_count=None):
    """Integer codes and labels of a grouping factor (an interaction when several variables, levels
    ordered as R's factor(a:b): by a, then b). `check_count(n_levels)` runs before the labels are made, so a
    factor refused for its size costs its codes only. Vectorized: a 10,000,000-level factor took 31 s with
    one Python str() per level."""
    parts, compact = [], len(group) > 1
    for name in group:
        c, levels, categorical = factor_codes(frame[name])
        parts.append((c, levels))
        compact |= categorical                  # unused categories: renumber the levels that occur
    if not compact:
        codes, levels = parts[0]
        if check_count is not None:
            check_count(len(levels))
        return codes, tuple(_level_names(levels).tolist())
    sizes = [len(levels) for _, levels in parts]
    codes, present = sorted_codes(np.ravel_multi_index([c for c, _ in parts], sizes))
    if check_count is not None:
        check_count(len(present))
    which = np.unravel_index(present, sizes)
    labels = _level_names(parts[0][1])[which[0]]
    for (_, levels), idx in zip(parts[1:], which[1:]):
        labels = np.char.add(np.char.add(labels, ":"), _level_names(levels)[idx])
    return codes, tuple(labels.tolist())


def _level_names(levels) -> np.ndarray:
    """level_name of every level, as an array of str (at numpy speed for integer, bool and text levels)."""
    arr = np.asarray(levels)
    if arr.dtype.kind in "iubU":
        return arr.astype(str)
    return np.array([level_name(v) for v in levels], dtype=str)


def _random_term(spec: RandomSpec, frame, env):
    def check_count(n_levels):
        # Before any n x k or q-sized allocation: a factor with a level per row is refused at the cost of its
        # codes only (80 MB for a 10,000,000-level factor of 10,000,000 rows), not of the model's matrices.
        checks.check_levels(n_levels, spec.group_name, len(frame))
        checks.check_levels_below_observations(n_levels, spec.group_name, len(frame))

    codes, levels = group_codes(frame, spec.group, check_count)
    var = indicator_variable(spec.expr)
    if var is not None:
        checks.require_columns(frame, [var], f"random-effects term {spec.source}")
        c, lv, _ = factor_codes(frame[var])
        values = indicator_matrix(c, len(lv))
        columns = tuple(f"{var}{level_name(v)}" for v in lv)
        design_info = None
    else:
        desc = check_formula("~ " + spec.expr, frame.columns, env, f"random-effects term {spec.source}")
        # A random intercept is a column of ones: patsy builds its design from one row (5 ms a term on InstEval)
        intercept = spec.expr.strip() == "1"
        try:
            M = patsy.dmatrix(desc, frame.iloc[:1] if intercept else frame, return_type="dataframe",
                              NA_action="raise", eval_env=env)
        except patsy.PatsyError as exc:
            raise FormulaError(f"cannot evaluate the columns of {spec.source}: {exc}") from None
        values = np.ones((len(frame), 1)) if intercept else M.to_numpy(dtype=float)
        columns = tuple(_lme4_name(c) for c in M.columns)
        if not intercept:
            checks.check_random_columns(values, columns, spec.source)
        design_info = M.design_info
    k = len(columns)
    if k == 0:
        raise FormulaError(f"{spec.source} has no columns; write '(1 | g)' for a random intercept.")
    term = RandomTerm.from_codes(spec.group_name, codes, values, len(levels), CovarianceTemplate.unstructured(k),
                                 levels, columns)
    return term, TermInfo(spec, spec.group_name, columns, levels, design_info, var)


def _unique_group_names(infos):
    """R's make.unique on the group names: the second 'Subject' becomes 'Subject.1'."""
    seen, out = {}, []
    for info in infos:
        n = seen.get(info.grp, 0)
        seen[info.grp] = n + 1
        grp = info.grp if n == 0 else f"{info.grp}.{n}"
        out.append(TermInfo(info.spec, grp, info.columns, info.levels, info.design_info, info.indicator))
    return out
