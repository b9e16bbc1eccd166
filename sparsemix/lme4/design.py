"""The lme4 door's design: a formula and a data frame turned into the engine's inputs (X, y, random-effect
terms, prior weights, offset) by lme4's rules (formula/design_rules.py), with what the results need to describe
the model and to predict for new data."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy

from .. import checks
from ..core.system import PenalizedSystem
from ..core.terms import CovarianceTemplate, RandomTerm, indicator_matrix
from ..errors import DroppedRowsWarning, FormulaError, InputError
from ..fit.stages import build_system
from ..formula.design_rules import (
    TermInfo,
    complete_rows,
    drop_aliased,
    group_codes,
    lme4_name,
    lme4_term_order,
    missing_counts,
    r_column_order,
    unique_group_names,
)
from ..formula.lme4 import RandomSpec, parse_formula
from ..formula.mixedlm import (
    FrameColumns,
    fixed_arrays,
    formula_columns,
    indicator_names,
    indicator_variable,
    numeric_design,
)
from ..formula.safety import check_formula, readable_formula, safe_environment, used_environment

__all__ = ["LmerDesign", "build_design", "theta_lower_bounds"]


@dataclass(frozen=True)
class LmerDesign:
    """A model in lme4's language, read from a data frame: the complete rows' response, fixed-effect matrix
    (aliased columns dropped) and random-effect terms in lme4's order, with the names, levels and patsy designs
    that describe them and rebuild them for new data."""

    formula: str
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
    fixed_columns: tuple[int, ...] = ()  # the columns of fixed_info's design kept (aliased ones dropped)
    offset_columns: tuple[int, ...] = ()  # the columns of fixed_info's design that are offset() terms

    @property
    def nobs(self) -> int:
        return self.y.shape[0]

    @property
    def response(self) -> np.ndarray:
        """What the engine fits: the response less the offset."""
        return self.y - self.offset

    def system(self) -> PenalizedSystem:
        return build_system(self.X, self.response, list(self.terms), weights=self.weights)


def theta_lower_bounds(terms) -> np.ndarray:
    """theta's bounds as RelativeCovariance.lower_bounds, from the terms alone (before the system is built)."""
    return np.concatenate([[0.0 if i == j else -np.inf for i, j in t.template.positions] for t in terms])


def build_design(formula, data, weights=None, offset=None, eval_env=None, linear: bool = True) -> LmerDesign:
    """The design of `formula` on `data`. `linear`: lme4's checks that a term's levels (or random effects) stay
    below the number of observations (a residual variance to tell them from); glmer has none, and an
    observation-level random effect is how a count model takes overdispersion."""
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
    parsed = parse_formula(formula)
    env = eval_env if eval_env is not None else safe_environment()
    columns = FrameColumns(data)  # each column read out of the frame once (pandas' lookup: ~10 us a time)
    used = formula_columns([parsed.fixed] + [s.expr for s in parsed.random], columns.names)
    for spec in parsed.random:
        checks.require_columns(data, spec.group, f"grouping factor of {spec.source}")
        used += [g for g in spec.group if g not in used]
    formulas = [parsed.fixed] + [s.expr for s in parsed.random]
    checked = checks.check_column_types(
        data,
        formula_columns(formulas, columns.names),
        [g for s in parsed.random for g in s.group],
        formulas,
        [v for v in (weights, offset) if isinstance(v, str) and v in data.columns],
        column=columns.column,
    )
    if checked is not data:
        data, columns = checked, FrameColumns(checked)
    w = _column_or_array(data, weights, "weights")
    off = _column_or_array(data, offset, "offset")
    keep = complete_rows(data, used, [arr for arr in (w, off) if arr is not None], column=columns.column)
    n_dropped = int((~keep).sum())
    if n_dropped > DROPPED_WARNING_SHARE * len(data):
        _warn_dropped(data, used, n_dropped, columns.column, {"weights": w, "offset": off})
    frame = data if n_dropped == 0 else data.loc[keep]  # read only: no copy when every row is complete
    checks.check_not_empty(len(frame), "data" if n_dropped == 0 else "data after dropping incomplete rows")
    w = None if w is None else w[keep]
    off = np.zeros(len(frame)) if off is None else off[keep]
    if w is not None and np.any(w <= 0):
        raise InputError("weights must be positive; drop the rows with zero weight or fix the weights column.")
    if w is not None:
        checks.check_weights_scale(w)

    if n_dropped:
        columns = FrameColumns(frame)
    if parsed.response in frame.columns:  # before patsy, which would expand a text column into indicators
        response = columns.column(parsed.response)
        checks.require_numeric_column(response, f"response {parsed.response!r}")
        if pd.api.types.is_bool_dtype(response.dtype):  # TRUE/FALSE as 1/0, as R reads them
            frame = frame.assign(**{parsed.response: response.to_numpy(dtype=float)})
            columns = FrameColumns(frame)
    endog, X, exog_names, fixed_info = fixed_arrays(parsed.fixed, frame, env, columns)
    # patsy's columns in R's order (lme4's coefficient order, and the order aliased columns are dropped in)
    column_order = r_column_order(fixed_info, readable_formula(parsed.fixed, columns.names))
    X, exog_names = X[:, column_order], [exog_names[j] for j in column_order]
    y = checks.as_numeric_vector(endog, "response")
    checks.check_finite(y, f"response {parsed.response!r}", missing_hint=False)
    checks.check_response_varies(y, parsed.response)
    checks.check_finite(X, "fixed-effects design", missing_hint=False)
    # offset(expr) terms of the formula came through patsy as I(expr) columns: into the offset, out of X
    offset_columns = _offset_columns(parsed.offsets, exog_names)
    if offset_columns:
        off = off + X[:, offset_columns].sum(axis=1)
        others = [j for j in range(X.shape[1]) if j not in offset_columns]
        X, exog_names = X[:, others], [exog_names[j] for j in others]
    else:
        others = list(range(X.shape[1]))
    names = [lme4_name(c) for c in exog_names]
    kept, dropped = drop_aliased(X, names)
    X, names = X[:, kept], [names[j] for j in kept]
    kept = [column_order[others[j]] for j in kept]  # in patsy's design's columns
    checks.check_fixed_columns_vs_nobs(X.shape[1], len(y), names)

    infos, terms = [], []
    for spec in parsed.random:
        term, info = _random_term(spec, frame, env, linear, columns)
        if linear:
            checks.check_nobs_vs_n_random_effects(term.n_levels * term.k, len(frame), spec.source)
        terms.append(term)
        infos.append(info)
    order = lme4_term_order([t.n_levels for t in terms])
    terms = [terms[i] for i in order]
    infos = unique_group_names([infos[i] for i in order])
    if not terms:
        raise FormulaError(f"{formula!r} has no random-effects term; add one such as '(1 | g)'.")
    return LmerDesign(
        formula,
        y,
        X,
        tuple(names),
        fixed_info,
        tuple(terms),
        tuple(infos),
        w,
        off,
        frame.index,
        n_dropped,
        tuple(dropped),
        used_environment(env, [parsed.fixed] + [s.expr for s in parsed.random]),
        tuple(kept),
        tuple(column_order[j] for j in offset_columns),
    )


def _offset_columns(offsets: tuple[str, ...], exog_names: list[str]) -> list[int]:
    """The columns of patsy's fixed design that are the formula's offset(expr) terms (written I(expr))."""
    spaced = {name.replace(" ", ""): j for j, name in enumerate(exog_names)}
    out = []
    for term in offsets:
        j = spaced.get(term.replace(" ", ""))
        if j is None:
            raise FormulaError(f"offset term {term[2:-1]!r} must be one numeric column (a number per row).")
        out.append(j)
    return out


def _column_or_array(data, value, role):
    if value is None:
        return None
    if isinstance(value, str):
        checks.require_columns(data, [value], role)
        value = data[value].to_numpy()
    arr = checks.as_numeric_vector(value, role)
    checks.check_length(arr, len(data), role, reference="data")
    return arr


# More than this share of the rows dropped for missing values is said (lme4's na.omit is silent): a file read with a
# level written "None" or "NA" loses those rows to pandas' missing values, and the model is fitted to what is left.
DROPPED_WARNING_SHARE = 0.5


def _warn_dropped(data, used, n_dropped, column, arrays) -> None:
    counts = missing_counts(data, used, column=column)
    counts.update({name: int((~np.isfinite(a)).sum()) for name, a in arrays.items() if a is not None})
    shown = ", ".join(f"{name} {count:,}" for name, count in list(counts.items())[:4] if count)
    warnings.warn(
        f"{n_dropped:,} of {len(data):,} rows ({100 * n_dropped / len(data):.0f}%) have a missing value in a column "
        f"the model uses and were dropped before the fit, as lme4's na.omit drops them (missing: {shown}). If those "
        "values are not missing in your data, check how it was read: pandas' read_csv reads NA, None, null and empty "
        "fields as missing (keep_default_na=False keeps them as text).",
        DroppedRowsWarning,
        stacklevel=4,
    )


def _random_term(spec: RandomSpec, frame, env, linear: bool = True, reader: FrameColumns | None = None):
    """(RandomTerm, TermInfo) of one bar term on `frame`; `reader`: the design's FrameColumns of it."""
    reader = FrameColumns(frame) if reader is None else reader

    def check_count(n_levels):
        # Before any n x k or q-sized allocation: a factor with a level per row is refused at the cost of its
        # codes only (80 MB for a 10,000,000-level factor of 10,000,000 rows), not of the model's matrices.
        checks.check_levels(n_levels, spec.group_name, len(frame))
        if linear:
            checks.check_levels_below_observations(n_levels, spec.group_name, len(frame))

    codes, levels = group_codes(frame, spec.group, check_count, reader)
    var = indicator_variable(spec.expr)
    if var is not None:
        checks.require_columns(frame, [var], f"random-effects term {spec.source}")
        c, lv, _ = reader.factor_codes(var)
        values = indicator_matrix(c, len(lv))
        columns = tuple(indicator_names(spec.expr, lv))
        design_info = None
    else:
        # A random intercept is a column of ones, its design the same for every data set and namespace: patsy
        # builds it once (from one row: 5 ms a term on InstEval; 0.6 ms on a small model)
        if spec.expr.strip() == "1":
            values = np.ones((len(frame), 1))
            columns, design_info = _intercept_design()
            return _make_term(spec, codes, values, levels, columns, design_info, var)
        rhs = "~ " + spec.expr
        desc = check_formula(rhs, reader.names, env, f"random-effects term {spec.source}")
        try:
            M = numeric_design(patsy.dmatrix, rhs, desc, frame, env, columns=reader)
        except patsy.PatsyError as exc:
            raise FormulaError(f"cannot evaluate the columns of {spec.source}: {exc}") from None
        values = np.asarray(M, dtype=float)
        columns = tuple(lme4_name(c) for c in M.design_info.column_names)
        checks.check_random_columns(values, columns, spec.source)
        design_info = M.design_info
    return _make_term(spec, codes, values, levels, columns, design_info, var)


_INTERCEPT: list = []


def _intercept_design():
    """(column names, patsy design) of a random intercept `~ 1`: made from a one-row frame the first time."""
    if not _INTERCEPT:
        M = patsy.dmatrix("~ 1", pd.DataFrame(index=[0]), return_type="dataframe", NA_action="raise")
        _INTERCEPT.append((tuple(lme4_name(c) for c in M.columns), M.design_info))
    return _INTERCEPT[0]


def _make_term(spec, codes, values, levels, columns, design_info, var):
    k = len(columns)
    if k == 0:
        raise FormulaError(f"{spec.source} has no columns; write '(1 | g)' for a random intercept.")
    term = RandomTerm.from_codes(
        spec.group_name, codes, values, len(levels), CovarianceTemplate.unstructured(k), levels, columns
    )
    return term, TermInfo(spec, spec.group_name, columns, levels, design_info, var)
