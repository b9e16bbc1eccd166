"""`sparsemix.lmer(formula, data)`: lme4's formula language on the sparse engine. The design (design.py) goes
through the one pipeline (fit/pipeline.py); the results keep the design and the deviance function, so that they
refit by ML, profile and bootstrap without touching the data again."""

from __future__ import annotations

import pandas as pd

from .. import checks
from ..core.threads import fit_threads
from ..fit.optimize import DEFAULT_OPTIMIZER, resolve_method
from ..fit.pipeline import fit_lmm
from ..formula.design_rules import theta_names
from ..formula.safety import formula_environment
from ..progress import ProgressPrinter
from .design import build_design, theta_lower_bounds
from .results import LmerResults

__all__ = ["lmer"]


def lmer(
    formula: str,
    data: pd.DataFrame,
    reml: bool = True,
    weights=None,
    offset=None,
    start=None,
    optimizer: str = DEFAULT_OPTIMIZER,
    maxiter: int = 10_000,
    progress=None,
    verbose: bool = False,
    eval_env=None,
) -> LmerResults:
    """Fit a linear mixed model written in lme4's formula language.

    weights: prior weights (a column name or an array), as lme4's `weights`: residual variance sigma^2 / w.
    offset: a column name or an array added to the linear predictor.
    Rows with missing values in any variable the model uses are dropped (lme4's na.omit); see `n_dropped`.
    verbose: print the optimizer's progress (evaluations, deviance, elapsed) to standard error, at most once a
    second; `progress` takes any callable(evaluation, deviance, seconds) instead. The log is kept either way
    (`results.fit_log`).
    eval_env: where the functions a formula calls besides the fixed list come from (docs/formulas.md): by
    default the caller's namespace, as patsy's eval_env=0; {} for the fixed list only.
    A Dask DataFrame as `data` is fitted on its cluster (docs/dask.md).
    """
    checks.check_progress(progress)
    reml = checks.check_bool(reml, "reml")
    verbose = checks.check_bool(verbose, "verbose")
    maxiter = checks.check_count(maxiter, "maxiter")
    if verbose and progress is None:
        progress = ProgressPrinter()
    if not isinstance(data, pd.DataFrame):
        # The one import against the layer order (tests/test_layout.py): the Dask door, loaded only for a Dask
        # frame (dask is an optional extra, and loading it cost a pandas fit 8 ms).
        from ..dask.fit import fit_partitioned, is_dask_frame

        if is_dask_frame(data):  # rows on a cluster: only level sets and cross-products come here
            caller = formula_environment(None) if eval_env is None else None
            return fit_partitioned(
                formula,
                data,
                reml=reml,
                weights=weights,
                offset=offset,
                start=start,
                optimizer=optimizer,
                maxiter=maxiter,
                progress=progress,
                eval_env=eval_env,
                caller_env=caller,
            )
    env = formula_environment(eval_env)  # the caller's functions, checked in formula/safety.py
    with fit_threads():  # one BLAS thread but where a stage pays for more (core/threads.py)
        design = build_design(formula, data, weights=weights, offset=offset, eval_env=env)
        method = resolve_method(optimizer)
        names = theta_names(design.term_info, design.terms)
        if start is not None:  # before any optimizer: a NaN start once reached nlopt and corrupted memory
            start = checks.check_start(
                start, theta_lower_bounds(design.terms), "start", names, limit=checks.START_LIMIT
            )
        fit = fit_lmm(
            design.X,
            design.response,
            list(design.terms),
            reml=reml,
            weights=design.weights,
            start_theta=start,
            method=method,
            maxiter=maxiter,
            progress=progress,
            singular_names=names,
        )
    return LmerResults(design, fit)
