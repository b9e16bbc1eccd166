"""Fits from a Dask DataFrame: the rows stay on the workers; level sets and cross-products travel.

Everything the deviance needs is a sum over rows. Three passes over the partitions, each returning objects
whose size depends on the numbers of levels and fixed effects, never on the rows:

1. the distinct values of every grouping variable and every categorical column of the fixed part (so that all
   partitions code levels and design columns alike), and the count of complete rows;
2. X'X and X'y (prior weights applied), to take the least-squares fit out of y as CrossProducts does in memory,
   and the random-effect columns' moments, for the centred and scaled columns the optimizer works on
   (coordinates.py), as in memory;
3. Z'Z (sparse), Z'X, Z'r, X'r and r'r for r = y - offset - X beta_ols, with Z in those columns.

On a large crossed design (pilot.py) a fourth pass sums the same cross-products over the rows of a tenth of the
smaller factors' levels, for the pilot fit that starts the optimizer near the optimum.

Each pass maps a function over the partitions (`dask.delayed`, so a lost worker's tasks are recomputed) and
sums the partial results pairwise in a tree; only the root reaches the client. The client then builds the
same PenalizedSystem an in-memory fit builds, and optimizes there: evaluations never touch the rows.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy
import scipy.sparse as sp

from .. import checks
from ..core.coordinates import column_moments, transform_columns, transform_from_moments
from ..core.cross_products import CrossProducts, assemble_Z
from ..core.system import PenalizedSystem
from ..errors import FormulaError, InputError, RankDeficientError, require_extra
from ..fit.stages import build_fit, optimize_system, warn_if_singular
from ..formula.lme4 import parse_formula
from ..formula.mixedlm import formula_columns, indicator_variable, level_name
from ..formula.safety import check_formula, readable_formula, safe_environment
from ..formula.newdata import LevelMatcher, report_new_levels
from ..lme4.lmer import RankDeficiencyWarning, TermInfo, _lme4_name, _unique_group_names, group_codes
from ..fit.optimize import DEFAULT_OPTIMIZER, resolve_method
from ..fit.pilot import estimable, fit_pilot, pilot_levels, pilot_wanted
from ..core.relcov import RelativeCovariance
from ..core.terms import CovarianceTemplate, RandomTerm, indicator_matrix, sorted_codes
from ..core.threads import blas_threads, single_threaded

__all__ = ["is_dask_frame", "fit_partitioned", "PartitionedDesign"]

# Stateful transforms learn from the whole column (a mean, a basis); a partition sees only its own rows.
STATEFUL = ("center", "standardize", "scale", "poly")
# lme4's rule, the same as _drop_aliased: a column whose residual on the earlier columns, relative to its
# norm, is below this is aliased. On X'X the squared ratio is compared.
ALIASED_RELATIVE_NORM = 1e-7


def is_dask_frame(data) -> bool:
    return type(data).__module__.split(".")[0] in ("dask", "dask_expr") and hasattr(data, "npartitions")


@dataclass(frozen=True)
class PartitionSpec:
    """What every partition needs to build its rows of X and Z alike; small and picklable (no patsy objects)."""

    fixed: str                                   # patsy "response ~ rhs"
    used: tuple[str, ...]
    categories: dict = field(default_factory=dict)      # column -> global levels, for categorical columns
    random: tuple = ()                           # (expr, group, n_levels, k, labels) per term, in fit order
    weights: str | None = None
    offset: str | None = None
    keep_columns: tuple[int, ...] | None = None  # fixed-effect columns kept after the aliasing check
    listed_levels_only: bool = False             # a pilot's subsample: rows of levels not in `random` left out
    column_transforms: tuple = ()                # per term, None or T: the system's columns Z (I kron T)


@dataclass(frozen=True)
class PartitionedDesign:
    """The design of a partitioned fit, as LmerResults reads it; the rows stay in `data` on the cluster."""

    formula: str
    data_name: str
    fe_names: tuple[str, ...]
    terms: tuple[RandomTerm, ...]
    term_info: tuple[TermInfo, ...]
    n_dropped: int
    dropped_columns: tuple[str, ...]
    nobs: int
    data: object = field(repr=False)
    spec: PartitionSpec = field(repr=False)
    transferred_bytes: int = 0      # what the passes brought to the client (the roots of their trees)
    fixed_info: object = field(default=None, repr=False)
    weights: None = None
    offset: None = None
    row_index: None = None
    eval_env: None = None
    X: None = None
    y: None = None


def fit_partitioned(formula: str, data, reml: bool = True, weights=None, offset=None, start=None,
                    optimizer: str = DEFAULT_OPTIMIZER, maxiter: int = 10_000, progress=None, eval_env=None,
                    caller_env=None):
    """lmer() for a Dask DataFrame (see the module docstring). `caller_env`, the namespace lmer was called from,
    serves only to say so when a formula calls a function from it."""
    require_extra("dask", "dask", "fitting a Dask DataFrame")
    from .results import PartitionedLmerResults

    if eval_env not in (None, {}):
        raise InputError("eval_env cannot travel to Dask workers; with a Dask DataFrame, formulas use the allowed "
                         "functions only (docs/formulas.md).")
    for role, value in (("weights", weights), ("offset", offset)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"with a Dask DataFrame, {role} must be a column name; got {type(value).__name__}.")
    parsed = parse_formula(formula)
    columns = list(data.columns)
    _check_formulas([(parsed.fixed, "formula")] + [("~ " + r.expr, f"random-effects term {r.source}")
                                                   for r in parsed.random], columns, caller_env)
    for r in parsed.random:
        checks.require_columns(data._meta, r.group, f"grouping factor of {r.source}")
    _refuse_stateful(parsed)
    for role, name in (("weights", weights), ("offset", offset)):
        if name is not None:
            checks.require_columns(data._meta, [name], role)
    used = formula_columns([parsed.fixed] + [r.expr for r in parsed.random], columns)
    used = list(dict.fromkeys(used + [g for r in parsed.random for g in r.group]
                              + [c for c in (weights, offset) if c is not None]))
    if parsed.response in columns:
        checks.require_numeric_column(data._meta[parsed.response], f"response {parsed.response!r}")
    categorical = _categorical_columns(parsed, data._meta)
    base = PartitionSpec(parsed.fixed, tuple(used), weights=weights, offset=offset)

    # Pass 1: levels, and the complete rows.
    groups = [tuple(r.group) for r in parsed.random]
    found = _tree(data, _levels_of_partition, _merge_levels, base, categorical, groups).compute()
    transferred = _nbytes(found)
    n, n_dropped = found["n"], found["dropped"]
    checks.check_not_empty(n, "data" if n_dropped == 0 else "data after dropping incomplete rows")
    categories = {c: found["columns"][c] for c in categorical}
    random, infos = [], []
    for r in parsed.random:
        combos = found["groups"][tuple(r.group)]
        frame = pd.DataFrame({g: combos[:, i] for i, g in enumerate(r.group)})
        _, labels = group_codes(frame, tuple(r.group))       # the in-memory fit's labels and level order
        checks.check_levels(len(labels), r.group_name, n)
        checks.check_levels_below_observations(len(labels), r.group_name, n)
        columns_r = _term_columns(r, data._meta, categories)
        checks.check_nobs_vs_n_random_effects(len(labels) * len(columns_r), n, r.source)
        random.append((r.expr, tuple(r.group), len(labels), len(columns_r), labels))
        infos.append(TermInfo(r, r.group_name, columns_r, labels, None, indicator_variable(r.expr)))
    order = sorted(range(len(random)), key=lambda i: -random[i][2])          # most levels first, as lmer
    random = [random[i] for i in order]
    infos = _unique_group_names([infos[i] for i in order])
    spec = PartitionSpec(parsed.fixed, tuple(used), categories, tuple(random), weights, offset)

    # Pass 2: X'X and X'y; the aliased columns and the least-squares shift; the working columns.
    fixed_names = _fixed_names(spec, data._meta)
    totals = _tree(data, _fixed_sums, _add, spec).compute()
    transferred += _nbytes(totals)
    templates = [CovarianceTemplate.unstructured(k) for (_, _, _, k, _) in random]
    transforms = tuple(transform_from_moments(totals[f"moments{t}"], template) if f"moments{t}" in totals else None
                       for t, template in enumerate(templates))
    spec = PartitionSpec(**{**spec.__dict__, "column_transforms": transforms})
    keep, dropped = _unaliased(totals["XtX"], fixed_names)
    XtX = totals["XtX"][np.ix_(keep, keep)]
    beta_ols = np.linalg.lstsq(XtX, totals["Xty"][keep], rcond=None)[0] if keep else np.zeros(0)
    spec = PartitionSpec(**{**spec.__dict__, "keep_columns": tuple(keep)})

    # Pass 3: everything else, with y - X beta_ols.
    sums = _tree(data, _cross_sums, _add, spec, beta_ols).compute()
    transferred += _nbytes(sums)
    cross = _cross_products(sums, XtX, beta_ols, totals["sum_log_weights"], n)
    relcov = RelativeCovariance([(nl, t) for (_, _, nl, _, _), t in zip(random, templates)], transforms)
    with blas_threads(single_threaded(relcov.q)):
        system = PenalizedSystem(cross, relcov)
    method, step = resolve_method(optimizer), None
    if pilot_wanted(start, method):
        pilot = _pilot(data, spec, system, beta_ols, templates, bool(reml))
        if pilot is not None:
            (start, step), pilot_bytes = pilot
            transferred += pilot_bytes
    opt = optimize_system(system, reml=bool(reml), start_theta=start, method=method, maxiter=maxiter,
                          progress=progress, initial_step=step)
    fit = build_fit(system, opt, bool(reml))
    terms = tuple(RandomTerm(i.spec.group_name, sp.csc_matrix((0, nl * t.k)), nl, t, i.levels, i.columns)
                  for i, (_, _, nl, _, _), t in zip(infos, random, templates))
    design = PartitionedDesign(formula, "data", tuple(fixed_names[j] for j in keep), terms, tuple(infos),
                               n_dropped, tuple(dropped), n, data, spec, transferred_bytes=transferred)
    results = PartitionedLmerResults(design, fit)
    warn_if_singular(fit, results.theta_names)
    return results


# -- client-side helpers ---------------------------------------------------------------------------------

def _pilot(data, spec, system, beta_ols, templates, reml):
    """The in-memory fit's pilot (pilot.py) from one more pass, over the rows of the kept levels only:
    ((theta, first step), bytes transferred), or None where no pilot pays."""
    kept = pilot_levels(system)
    if kept is None:
        return None
    random = tuple(r if levels is None else (r[0], r[1], len(levels), r[3], tuple(r[4][i] for i in levels))
                   for r, levels in zip(spec.random, kept))
    pilot_spec = PartitionSpec(**{**spec.__dict__, "random": random, "listed_levels_only": True})
    sums = _tree(data, _cross_sums, _add, pilot_spec, beta_ols).compute()
    if not estimable(sums["XtX"], sums["n"]):
        return None
    cross = _cross_products(sums, sums["XtX"], beta_ols, sums["sum_log_weights"], sums["n"])
    relcov = RelativeCovariance([(n, t) for (_, _, n, _, _), t in zip(random, templates)], spec.column_transforms)
    with blas_threads(single_threaded(relcov.q)):
        pilot_system = PenalizedSystem(cross, relcov, factorization="schur"
                                       if system.factorization_mode == "schur" else None)
    result = fit_pilot(pilot_system, reml)
    return None if result is None else (result, _nbytes(sums))


def _tree(data, per_partition, combine, *args):
    """per_partition(partition, *args) on every partition, combined pairwise in a tree: one Delayed."""
    from dask import delayed

    level = [delayed(per_partition)(part, *args) for part in data.to_delayed()]
    while len(level) > 1:
        level = [delayed(combine)(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


def _check_formulas(formulas, columns, caller_env):
    """The fixed list only: the caller's functions cannot travel to the workers."""
    for text, role in formulas:
        try:
            check_formula(text, columns, safe_environment(), role)
        except FormulaError:
            if caller_env is None:
                raise
            check_formula(text, columns, caller_env, role)      # its own error where the caller's names fail too
            raise FormulaError(f"{role} {text!r} calls a function of your code; with a Dask DataFrame, formulas "
                               "call only the fixed list of docs/formulas.md (functions cannot travel to the "
                               "workers). Compute the column first (ddf['x2'] = f(ddf['x'])) and use it.") from None


def _refuse_stateful(parsed):
    for code in [parsed.fixed] + [r.expr for r in parsed.random]:
        for name in STATEFUL:
            if f"{name}(" in code:
                raise FormulaError(f"{name}() learns from a whole column, which a Dask partition does not see; "
                                   "compute it first (e.g. ddf['x_c'] = ddf.x - ddf.x.mean()) and use that column.")


def _categorical_columns(parsed, meta: pd.DataFrame) -> list[str]:
    """Columns whose levels must be the same in every partition: text, categorical, or inside C(...)."""
    wanted = set()
    formulas = [parsed.fixed] + ["~ " + r.expr for r in parsed.random if indicator_variable(r.expr) is None]
    codes = []
    for formula in formulas:
        desc = readable_formula(formula, meta.columns)
        codes += [f.code for t in desc.lhs_termlist + desc.rhs_termlist for f in t.factors]
    for code in codes:
        for node in ast.walk(ast.parse(code, mode="eval")):
            name = _column_of(node, meta.columns)
            if name is not None:
                dtype = meta[name].dtype
                if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
                    wanted.add(name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "C" and node.args:
                inside = (_column_of(n, meta.columns) for n in ast.walk(node.args[0]))
                wanted.update(name for name in inside if name is not None)
    for r in parsed.random:
        var = indicator_variable(r.expr)
        if var is not None:
            wanted.add(var)
    return sorted(wanted)


def _column_of(node, columns):
    """The column an expression node names: `x`, or `Q("x")` (backticks, keyword-named columns)."""
    if isinstance(node, ast.Name) and node.id in columns:
        return node.id
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Q" and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value in columns):
        return node.args[0].value
    return None


def _term_columns(r, meta, categories) -> tuple[str, ...]:
    var = indicator_variable(r.expr)
    if var is not None:
        return tuple(f"{var}{level_name(v)}" for v in categories[var])
    M = _on_prototype(patsy.dmatrix, "~ " + r.expr, meta, categories, return_type="dataframe")
    return tuple(_lme4_name(c) for c in M.columns)


def _fixed_names(spec, meta) -> list[str]:
    _, X = _on_prototype(patsy.dmatrices, spec.fixed, meta, spec.categories, return_type="dataframe")
    return [_lme4_name(c) for c in X.columns]


def _unaliased(XtX: np.ndarray, names: list[str]):
    """Columns kept in order, as _drop_aliased decides it on X, here from X'X: a column whose squared
    residual norm on the kept ones is below ALIASED_RELATIVE_NORM^2 of its own is dropped."""
    keep = []
    for j in range(XtX.shape[0]):
        if XtX[j, j] <= 0:
            continue
        resid = XtX[j, j]
        if keep:
            K = np.array(keep)
            resid -= XtX[j, K] @ np.linalg.solve(XtX[np.ix_(K, K)], XtX[K, j])
        if resid > ALIASED_RELATIVE_NORM ** 2 * XtX[j, j]:
            keep.append(j)
    dropped = [names[j] for j in range(len(names)) if j not in keep]
    if dropped:
        import warnings
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): "
                      f"{', '.join(dropped)}", RankDeficiencyWarning, stacklevel=4)
    if not keep and names:
        raise RankDeficientError("every fixed-effect column is zero in the data.")
    return keep, dropped


def _cross_products(sums, XtX, beta_ols, sum_log_weights, n) -> CrossProducts:
    """The in-memory CrossProducts, with one more least-squares step taken from X'r (as its second pass)."""
    Ztr, Xtr, rtr, ZtX = sums["Ztr"], sums["Xtr"], sums["rtr"], sums["ZtX"]
    if XtX.size:
        delta = np.linalg.lstsq(XtX, Xtr, rcond=None)[0]
        Ztr, rtr = Ztr - ZtX @ delta, float(rtr - 2 * delta @ Xtr + delta @ XtX @ delta)
        Xtr, beta_ols = Xtr - XtX @ delta, beta_ols + delta
    ZtZ = sp.csc_matrix(sums["ZtZ"])
    ZtZ.sort_indices()
    return CrossProducts(ZtZ=ZtZ, ZtX=ZtX, Zty=Ztr, XtX=XtX, Xty=Xtr, yty=rtr, n=n, p=XtX.shape[0],
                         beta_ols=beta_ols, sum_log_weights=sum_log_weights)


def _nbytes(obj) -> int:
    """Bytes of the arrays in a pass result (dicts of numpy arrays, scipy sparse matrices and numbers)."""
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if sp.issparse(obj):
        obj = obj.tocsc()
        return obj.data.nbytes + obj.indices.nbytes + obj.indptr.nbytes
    return int(getattr(obj, "nbytes", 8))


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


# -- what runs on the workers ----------------------------------------------------------------------------

def _prototype(frame: pd.DataFrame, categories: dict) -> pd.DataFrame:
    """No rows, the partition's dtypes, and the global levels of the categorical columns: patsy learns the
    same columns from it in every partition."""
    proto = frame.iloc[:0].copy()
    for c, levels in categories.items():
        proto[c] = pd.Categorical([], categories=levels)
    return proto


def _on_prototype(fn, formula, frame, categories, **kwargs):
    """patsy's `fn` (dmatrix, dmatrices) on the prototype of `frame`, the formula read as the fit read it."""
    proto = _prototype(frame, categories)
    return fn(readable_formula(formula, proto.columns), proto, eval_env=safe_environment(), **kwargs)


def _complete(part: pd.DataFrame, spec: PartitionSpec):
    frame = part[list(spec.used)]
    keep = np.array(frame.notna().all(axis=1), dtype=bool)
    for c in (spec.weights, spec.offset):
        if c is not None:
            keep &= np.isfinite(frame[c].to_numpy(dtype=float))
    return frame.loc[keep], int((~keep).sum())


def _levels_of_partition(part, spec, categorical, groups):
    frame, dropped = _complete(part, spec)
    return {"n": len(frame), "dropped": dropped,
            "columns": {c: sorted_codes(frame[c].to_numpy())[1] for c in categorical},
            "groups": {g: frame[list(g)].drop_duplicates().to_numpy() for g in groups}}


def _merge_levels(a, b):
    return {"n": a["n"] + b["n"], "dropped": a["dropped"] + b["dropped"],
            "columns": {c: sorted_codes(np.concatenate([a["columns"][c], b["columns"][c]]))[1] for c in a["columns"]},
            "groups": {g: pd.DataFrame(np.concatenate([a["groups"][g], b["groups"][g]])).drop_duplicates().to_numpy()
                       for g in a["groups"]}}


def _rows(part, spec):
    """This partition's complete rows as arrays: y, X (all columns), weights, offset, and the frame."""
    frame, _ = _complete(part, spec)
    frame = _as_categories(frame, spec)
    if spec.listed_levels_only:
        listed = np.ones(len(frame), dtype=bool)
        for _, group, _, _, labels in spec.random:
            listed &= _level_codes(frame, group, labels)[0] >= 0
        frame = frame.loc[listed]
    y_info, X_info = (m.design_info for m in _on_prototype(patsy.dmatrices, spec.fixed, frame, spec.categories))
    y, X = patsy.build_design_matrices([y_info, X_info], frame, NA_action="raise")
    w = None if spec.weights is None else frame[spec.weights].to_numpy(dtype=float)
    off = np.zeros(len(frame)) if spec.offset is None else frame[spec.offset].to_numpy(dtype=float)
    return np.asarray(y, dtype=float)[:, 0] - off, np.asarray(X, dtype=float), w, frame


def _fixed_sums(part, spec):
    y, X, w, frame = _rows(part, spec)
    sw = np.ones(len(y)) if w is None else np.sqrt(w)
    Xw, yw = X * sw[:, None], y * sw
    # a random intercept alone is its own working column: no moments, no Z for it in this pass
    shaped = [t for t, (expr, _, _, k, _) in enumerate(spec.random) if not (k == 1 and expr.strip() == "1")]
    only_shaped = PartitionSpec(**{**spec.__dict__, "random": tuple(spec.random[t] for t in shaped)})
    blocks = _partition_terms(frame, only_shaped)
    moments = {f"moments{t}": column_moments(block.Z, block.k) for t, block in zip(shaped, blocks)}
    return {"XtX": Xw.T @ Xw, "Xty": Xw.T @ yw, "sum_log_weights": 0.0 if w is None else float(np.sum(np.log(w))),
            **moments}


def _as_categories(frame, spec):
    for c, levels in spec.categories.items():
        if c in frame.columns:
            frame = frame.assign(**{c: pd.Categorical(frame[c], categories=levels)})
    return frame


def _design_matrix(part, spec) -> np.ndarray:
    """The fixed-effects columns of new data (no response needed), all columns before the aliasing check."""
    frame = _as_categories(part, spec)
    proto = _prototype(frame, spec.categories)
    rhs = patsy.ModelDesc([], readable_formula(spec.fixed, proto.columns).rhs_termlist)
    info = patsy.dmatrix(rhs, proto, eval_env=safe_environment()).design_info
    (X,) = patsy.build_design_matrices([info], frame, NA_action="raise")
    return np.asarray(X, dtype=float)


def _partition_Z(frame, spec, allow_new_levels=False, working=False) -> sp.csc_matrix:
    """Z for these rows in the fit's column layout; rows of levels the fit did not see get zero (population)
    effects when allowed. `working`: the system's centred, scaled columns (spec.column_transforms), for its
    cross-products; otherwise the data's, for predictions from random effects in the data's columns."""
    blocks = _partition_terms(frame, spec, allow_new_levels)
    if working and spec.column_transforms:
        return sp.hstack([transform_columns(b.Z, b.n_levels, T) for b, T in zip(blocks, spec.column_transforms)],
                         format="csc")
    return assemble_Z(blocks)


def _partition_terms(frame, spec, allow_new_levels=False) -> list[RandomTerm]:
    """Each random term's block of Z for these rows (see _partition_Z)."""
    frame = _as_categories(frame, spec)
    blocks = []
    for expr, group, n_levels, k, labels in spec.random:
        codes, new_labels = _level_codes(frame, group, labels)
        report_new_levels(int((codes < 0).sum()), len(codes), ":".join(group), new_labels, allow_new_levels)
        var = indicator_variable(expr)
        if var is not None:
            values = indicator_matrix(np.asarray(frame[var].cat.codes, dtype=np.int64), k).toarray()
        else:
            info = _on_prototype(patsy.dmatrix, "~ " + expr, frame, spec.categories).design_info
            (values,) = patsy.build_design_matrices([info], frame, NA_action="raise")
            values = np.array(values, dtype=float)
        values[codes < 0] = 0.0
        template = CovarianceTemplate.unstructured(k)
        blocks.append(RandomTerm.from_codes("t", np.maximum(codes, 0), values, n_levels, template, range(n_levels),
                                            tuple(map(str, range(k)))))
    return blocks


def _level_codes(frame, group, labels) -> tuple[np.ndarray, np.ndarray]:
    """Each row's position among `labels` (the fit's levels of `group`), -1 for a level not among them, and the
    levels not among them; levels match by value as in-memory predictions do (newdata.LevelMatcher: 308, 308.0
    and "308" are one level)."""
    local_codes, local_labels = group_codes(frame, group)
    local_labels = np.asarray(local_labels, dtype=object)
    positions = LevelMatcher(labels, ":".join(group)).positions(local_labels)
    return positions[local_codes], local_labels[positions < 0]


def _cross_sums(part, spec, beta_ols):
    y, X, w, frame = _rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    r = y - X @ beta_ols
    Z = _partition_Z(frame, spec, working=True)
    if w is not None:
        sw = np.sqrt(w)
        X, r, Z = X * sw[:, None], r * sw, sp.csc_matrix(sp.diags(sw) @ Z)
    Zt = sp.csr_matrix(Z.T)
    # X'X, the row count and sum(log w) again: a pilot's rows are not pass 2's.
    return {"ZtZ": sp.csc_matrix(Zt @ Z), "ZtX": np.asarray(Zt @ X), "Ztr": np.asarray(Zt @ r).ravel(),
            "Xtr": X.T @ r, "rtr": float(r @ r), "XtX": X.T @ X, "n": len(r),
            "sum_log_weights": 0.0 if w is None else float(np.sum(np.log(w)))}
