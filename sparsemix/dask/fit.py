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
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import patsy
import scipy.sparse as sp

from .. import checks
from ..checks import FACTOR_FUNCTIONS
from ..core.coordinates import transform_from_moments
from ..core.cross_products import CrossProducts
from ..core.relcov import RelativeCovariance
from ..core.system import PenalizedSystem
from ..core.terms import CovarianceTemplate, RandomTerm, equal_key_runs
from ..core.threads import blas_threads, single_threaded
from ..errors import FormulaError, InputError, require_extra
from ..fit.optimize import DEFAULT_OPTIMIZER, resolve_method
from ..fit.pilot import estimable, fit_pilot, pilot_levels
from ..fit.pipeline import fit_system
from ..formula.design_rules import (
    TermInfo,
    group_codes,
    lme4_name,
    lme4_term_order,
    r_column_order,
    theta_names,
    unaliased_from_gram,
    unique_group_names,
)
from ..formula.lme4 import parse_formula
from ..formula.mixedlm import formula_columns, indicator_names, indicator_variable
from ..formula.safety import SAFE_FUNCTIONS, check_formula, quoted_name, readable_formula, safe_environment
from .partitions import (
    PartitionSpec,
    PartitionTerm,
    add_sums,
    cross_sums,
    fixed_sums,
    levels_of_partition,
    merge_levels,
    nbytes,
    on_prototype,
    tree,
)
from .results import PartitionedLmerResults

__all__ = ["is_dask_frame", "fit_partitioned", "PartitionedDesign"]

# Stateful transforms learn from the whole column (a mean, a basis, knots, a level's position); a partition sees only
# its own rows. (patsy marks them: stateful_transform's wrapper)
STATEFUL = tuple(name for name, f in SAFE_FUNCTIONS.items() if hasattr(f, "__patsy_stateful_transform__"))


def is_dask_frame(data) -> bool:
    return type(data).__module__.split(".")[0] in ("dask", "dask_expr") and hasattr(data, "npartitions")


@dataclass(frozen=True)
class PartitionedDesign:
    """The design of a partitioned fit, as LmerResults reads it; the rows stay in `data` on the cluster."""

    formula: str
    fe_names: tuple[str, ...]
    terms: tuple[RandomTerm, ...]
    term_info: tuple[TermInfo, ...]
    n_dropped: int
    dropped_columns: tuple[str, ...]
    nobs: int
    data: object = field(repr=False)
    spec: PartitionSpec = field(repr=False)
    transferred_bytes: int = 0  # what the passes brought to the client (the roots of their trees)
    fixed_info: object = field(default=None, repr=False)
    weights: None = None
    offset: None = None
    row_index: None = None
    eval_env: None = None
    X: None = None
    y: None = None


def fit_partitioned(
    formula: str,
    data,
    reml: bool = True,
    weights=None,
    offset=None,
    start=None,
    optimizer: str = DEFAULT_OPTIMIZER,
    maxiter: int = 10_000,
    progress=None,
    eval_env=None,
    caller_env=None,
):
    """lmer() for a Dask DataFrame (see the module docstring). `caller_env`, the namespace lmer was called from,
    serves only to say so when a formula calls a function from it."""
    require_extra("dask", "dask", "fitting a Dask DataFrame")
    if eval_env not in (None, {}):
        raise InputError(
            "eval_env cannot travel to Dask workers; with a Dask DataFrame, formulas use the allowed "
            "functions only (docs/formulas.md)."
        )
    for role, value in (("weights", weights), ("offset", offset)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"with a Dask DataFrame, {role} must be a column name; got {type(value).__name__}.")
    parsed = parse_formula(formula)
    columns = list(data.columns)
    _check_formulas(
        [(parsed.fixed, "formula")] + [("~ " + r.expr, f"random-effects term {r.source}") for r in parsed.random],
        columns,
        caller_env,
    )
    for r in parsed.random:
        checks.require_columns(data._meta, r.group, f"grouping factor of {r.source}")
    _refuse_stateful(parsed)
    for role, name in (("weights", weights), ("offset", offset)):
        if name is not None:
            checks.require_columns(data._meta, [name], role)
    used = formula_columns([parsed.fixed] + [r.expr for r in parsed.random], columns)
    used = list(
        dict.fromkeys(
            used + [g for r in parsed.random for g in r.group] + [c for c in (weights, offset) if c is not None]
        )
    )
    if parsed.response in columns:
        checks.require_numeric_column(data._meta[parsed.response], f"response {parsed.response!r}")
    categorical = _categorical_columns(parsed, data._meta)
    base = PartitionSpec(parsed.fixed, tuple(used), weights=weights, offset=offset)

    # Pass 1: levels, and the complete rows.
    groups = [tuple(r.group) for r in parsed.random]
    found = tree(data, levels_of_partition, merge_levels, base, categorical, groups).compute()
    transferred = nbytes(found)
    n, n_dropped = found["n"], found["dropped"]
    checks.check_not_empty(n, "data" if n_dropped == 0 else "data after dropping incomplete rows")
    categories = {c: found["columns"][c] for c in categorical}
    random, infos = [], []
    for r in parsed.random:
        combos = found["groups"][tuple(r.group)]
        frame = pd.DataFrame({g: combos[:, i] for i, g in enumerate(r.group)})
        _, labels = group_codes(frame, tuple(r.group))  # the in-memory fit's labels and level order
        checks.check_levels(len(labels), r.group_name, n)
        checks.check_levels_below_observations(len(labels), r.group_name, n)
        columns_r = _term_columns(r, data._meta, categories)
        checks.check_nobs_vs_n_random_effects(len(labels) * len(columns_r), n, r.source)
        random.append(PartitionTerm(r.expr, tuple(r.group), len(labels), len(columns_r), labels))
        infos.append(TermInfo(r, r.group_name, columns_r, labels, None, indicator_variable(r.expr)))
    order = lme4_term_order([term.n_levels for term in random])
    random = [random[i] for i in order]
    infos = unique_group_names([infos[i] for i in order])
    spec = PartitionSpec(parsed.fixed, tuple(used), categories, tuple(random), weights, offset)

    # Pass 2: X'X and X'y; the aliased columns and the least-squares shift; the working columns.
    fixed_names, column_order = _fixed_columns(spec, data._meta)
    totals = tree(data, fixed_sums, add_sums, spec).compute()
    transferred += nbytes(totals)
    templates = [CovarianceTemplate.unstructured(term.k) for term in random]
    transforms = tuple(
        transform_from_moments(totals[f"moments{t}"], template) if f"moments{t}" in totals else None
        for t, template in enumerate(templates)
    )
    spec = PartitionSpec(**{**spec.__dict__, "column_transforms": transforms})
    # decided in R's column order, as the in-memory door decides it; `keep`: patsy's columns, in that order
    keep, dropped = unaliased_from_gram(
        totals["XtX"][np.ix_(column_order, column_order)], [fixed_names[j] for j in column_order]
    )
    keep = [column_order[j] for j in keep]
    XtX = totals["XtX"][np.ix_(keep, keep)]
    beta_ols = np.linalg.lstsq(XtX, totals["Xty"][keep], rcond=None)[0] if keep else np.zeros(0)
    spec = PartitionSpec(**{**spec.__dict__, "keep_columns": tuple(keep)})

    # Pass 3: everything else, with y - X beta_ols.
    sums = tree(data, cross_sums, add_sums, spec, beta_ols).compute()
    transferred += nbytes(sums)
    cross = _cross_products(sums, XtX, beta_ols, totals["sum_log_weights"], n)
    relcov = RelativeCovariance([(term.n_levels, t) for term, t in zip(random, templates)], transforms)
    # lme4's (x || g): consecutive scalar terms of one grouping, the same levels in the same order (group_codes)
    runs = equal_key_runs([term.group if term.k == 1 else None for term in random])
    with blas_threads(single_threaded(relcov.q)):
        system = PenalizedSystem(cross, relcov, diagonal_runs=runs)
    pilot_bytes = []
    pilot = (
        None
        if start is not None
        else (lambda: _pilot(data, spec, system, beta_ols, templates, bool(reml), pilot_bytes))
    )
    terms = tuple(
        RandomTerm(i.spec.group_name, sp.csc_matrix((0, term.n_levels * t.k)), term.n_levels, t, i.levels, i.columns)
        for i, term, t in zip(infos, random, templates)
    )
    fit = fit_system(
        system,
        reml=bool(reml),
        start_theta=start,
        method=resolve_method(optimizer),
        maxiter=maxiter,
        progress=progress,
        pilot=pilot,
        singular_names=theta_names(infos, terms),
    )
    design = PartitionedDesign(
        formula,
        tuple(fixed_names[j] for j in keep),
        terms,
        tuple(infos),
        n_dropped,
        tuple(dropped),
        n,
        data,
        spec,
        transferred_bytes=transferred + sum(pilot_bytes),
    )
    return PartitionedLmerResults(design, fit)


# -- client-side helpers ---------------------------------------------------------------------------------


def _pilot(data, spec, system, beta_ols, templates, reml, transferred: list):
    """The in-memory fit's pilot (pilot.py) from one more pass, over the rows of the kept levels only: (theta,
    first step), or None where no pilot pays; the pass's bytes are appended to `transferred`."""
    kept = pilot_levels(system)
    if kept is None:
        return None
    random = tuple(term if levels is None else term.restricted(levels) for term, levels in zip(spec.random, kept))
    pilot_spec = PartitionSpec(**{**spec.__dict__, "random": random, "listed_levels_only": True})
    sums = tree(data, cross_sums, add_sums, pilot_spec, beta_ols).compute()
    transferred.append(nbytes(sums))
    if not estimable(sums["XtX"], sums["n"]):
        return None
    cross = _cross_products(sums, sums["XtX"], beta_ols, sums["sum_log_weights"], sums["n"])
    relcov = RelativeCovariance([(term.n_levels, t) for term, t in zip(random, templates)], spec.column_transforms)
    with blas_threads(single_threaded(relcov.q)):
        pilot_system = PenalizedSystem(
            cross, relcov, factorization="schur" if system.factorization_mode == "schur" else None
        )
    return fit_pilot(pilot_system, reml)


def _check_formulas(formulas, columns, caller_env):
    """The fixed list only: the caller's functions cannot travel to the workers."""
    for text, role in formulas:
        try:
            check_formula(text, columns, safe_environment(), role)
        except FormulaError:
            if caller_env is None:
                raise
            check_formula(text, columns, caller_env, role)  # its own error where the caller's names fail too
            raise FormulaError(
                f"{role} {text!r} calls a function of your code; with a Dask DataFrame, formulas "
                "call only the fixed list of docs/formulas.md (functions cannot travel to the "
                "workers). Compute the column first (ddf['x2'] = f(ddf['x'])) and use it."
            ) from None


def _refuse_stateful(parsed):
    for code in [parsed.fixed] + [r.expr for r in parsed.random]:
        for name in STATEFUL:
            if re.search(rf"(?<![\w.]){name}\s*\(", code):
                raise FormulaError(
                    f"{name}() learns from a whole column, which a Dask partition does not see; "
                    "compute it first (e.g. ddf['x_c'] = ddf.x - ddf.x.mean()) and use that column."
                )


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
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in FACTOR_FUNCTIONS
                and node.args
            ):
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
    quoted = quoted_name(node)
    if quoted in columns:
        return quoted
    return None


def _term_columns(r, meta, categories) -> tuple[str, ...]:
    var = indicator_variable(r.expr)
    if var is not None:
        return tuple(indicator_names(r.expr, categories[var]))
    M = on_prototype(patsy.dmatrix, "~ " + r.expr, meta, categories, return_type="dataframe")
    return tuple(lme4_name(c) for c in M.columns)


def _fixed_columns(spec, meta) -> tuple[list[str], list[int]]:
    """The fixed design's column names (patsy's order) and its columns in R's order (design_rules.r_column_order)."""
    _, X = on_prototype(patsy.dmatrices, spec.fixed, meta, spec.categories, return_type="dataframe")
    order = r_column_order(X.design_info, readable_formula(spec.fixed, meta.columns))
    return [lme4_name(c) for c in X.columns], order


def _cross_products(sums, XtX, beta_ols, sum_log_weights, n) -> CrossProducts:
    """The in-memory CrossProducts from a pass's sums of the residual r = y - X beta_ols, with one more
    least-squares step taken from X'r (as the in-memory second pass takes it from the rows)."""
    ZtZ = sp.csc_matrix(sums["ZtZ"])
    ZtZ.sort_indices()
    p = XtX.shape[0]
    design = CrossProducts(
        ZtZ=ZtZ,
        ZtX=sums["ZtX"],
        Zty=sums["Ztr"],
        XtX=XtX,
        Xty=sums["Xtr"],
        yty=sums["rtr"],
        n=n,
        p=p,
        beta_ols=np.zeros(p),
        sum_log_weights=sum_log_weights,
    )
    cross = design.with_response_sums(sums["Ztr"], sums["Xtr"], sums["rtr"])
    return replace(cross, beta_ols=beta_ols + cross.beta_ols)
