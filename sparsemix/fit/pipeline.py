"""The one pipeline every front door calls: from a penalized system to a fitted model.

    fit_system(system, ...)   the start (a pilot fit's, where one pays), the optimizer, the fit, and lme4's
                              singular-fit warning
    fit_lmm(X, y, terms, ...) the same from arrays: build_system, then fit_system with the in-memory pilot

The doors differ only in how they build the system (rows in memory, cross-products summed on a Dask cluster)
and in the pilot they offer (pilot.pilot_start on rows; dask/ sums a pilot's cross-products on the cluster).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import checks
from ..core.system import PenalizedSystem
from ..core.terms import RandomTerm
from .lmm_fit import LmmFit
from .optimize import DEFAULT_OPTIMIZER, DERIVATIVE_METHODS
from .pilot import (
    COMPONENTS_OVER_PILOT_MAX_Q,
    components_over_pilot,
    components_start,
    covariance_start,
    moment_start,
    pilot_start,
    pilot_wanted,
)
from .stages import build_fit, build_system, optimize_system, warn_if_singular

__all__ = ["fit_system", "fit_lmm", "finish_fit", "optimized_system", "row_moments"]

# (theta, BOBYQA's first step) for the full fit, or None where no pilot pays
Pilot = Callable[[], "tuple[np.ndarray, np.ndarray] | None"]
# theta from the rows' moments (pilot.moment_start), or None where they do not apply; given the system the optimizer
# will work on (optimized_system), whose Hessian decides how a near-singular estimate is taken, and the criterion
Moments = Callable[[PenalizedSystem, bool], "np.ndarray | None"]


def fit_system(
    system: PenalizedSystem,
    reml: bool = True,
    start_theta=None,
    free=None,
    maxiter: int = 10_000,
    gtol: float = 1e-7,
    method: str = DEFAULT_OPTIMIZER,
    progress=None,
    pilot: Pilot | None = None,
    singular_names: list[str] | None = None,
    moments: Moments | None = None,
    fallback_start=None,
) -> LmmFit:
    """Fit the model whose deviance `system` evaluates. Without `start_theta` (and with nothing held fixed, by
    the default method) the fit starts from the door's row moments (`moments`: pilot.moment_start's, one grouping
    with slopes), else the variance components' moments (pilot.components_start: from the cross-products, so in
    every door), else, for the derivative methods' steps, MINQUE's moments of any terms (pilot.covariance_start,
    from the cross-products too), else `fallback_start` (the door's own; by default lme4's). `pilot`: offered by the
    door for a fit from the default start (None otherwise); run where the method uses a start and no entry is held fixed
    (pilot.pilot_wanted), unless the variance components' moments stand in for it (pilot.components_over_pilot).
    `singular_names`: theta's names, for lme4's singular-fit warning (None: the door words its own)."""
    step, components = None, None
    optimized = optimized_system(system, free, method)
    default = start_theta is None and free is None and method == DEFAULT_OPTIMIZER
    if default:
        # a growth curve's: the levels' own fits
        start_theta = moments(optimized, reml) if moments is not None else None
        if start_theta is None:  # variance components up to 1,000 levels, held dense or not: their moments
            start_theta = components = components_start(system, reml)  # (a 100-level intercept: 17 -> 5 evaluations)
        if start_theta is None and optimized.supports_gradient:  # any other terms: MINQUE's moments, for the
            # derivatives' steps (BOBYQA in CHOLMOD took as many from them); unweighted where the first term is
            # eliminated beside others, whose evaluations cost less than the weighted pass's dense q x q algebra
            weighted = not optimized.first_eliminated_beside_others
            start_theta = covariance_start(system, weighted=weighted)
    if start_theta is None:
        start_theta = fallback_start
    if pilot is not None and pilot_wanted(method, free, optimized):
        # the moments in place of a pilot fit, for the scoring steps (pilot.COMPONENTS_OVER_PILOT_MAX_ORDER); BOBYQA
        # keeps the pilot, whose first step it uses (InstEval: 50 evaluations from the pilot, 81 from the moments)
        over = default and components_over_pilot(system)
        if over and components is None:  # (above 1,000 columns: not computed yet)
            components = components_start(system, reml, COMPONENTS_OVER_PILOT_MAX_Q)
        if over and components is not None:
            start_theta = components
        else:
            start_theta, step = pilot() or (start_theta, None)
    opt = optimize_system(
        optimized,
        reml=reml,
        start_theta=start_theta,
        free=free,
        maxiter=maxiter,
        gtol=gtol,
        method=method,
        progress=progress,
        initial_step=step,
    )
    return finish_fit(system, opt, reml, free, singular_names, optimized)


def optimized_system(system: PenalizedSystem, free=None, method: str = DEFAULT_OPTIMIZER) -> PenalizedSystem:
    """The system the optimizer works on: `system`, or its runs of scalar terms of one grouping (lme4's `(x || g)`)
    merged into one term each (PenalizedSystem.merged_system: the same deviance and theta) where that gives the
    derivative methods the exact Hessian, or more than the split terms (each eliminated or factored on its own)
    give them. The fit is then read off it in the door's terms (PenalizedSystem.solution_from)."""
    if not system.diagonal_runs or free is not None or method not in DERIVATIVE_METHODS:
        return system
    merged = system.merged_system()
    found = _derivatives(merged)
    # (the Hessian needs no comparison: the split system's factorization is then never chosen)
    return merged if found == 3 or found > _derivatives(system) else system


def _derivatives(system: PenalizedSystem) -> int:
    """What the derivative methods get from `system`: 3 the exact Hessian, 2 scoring steps, 1 the gradient, 0 none."""
    if system.supports_hessian:
        return 3
    return 2 if system.supports_scoring else int(system.supports_gradient)


def finish_fit(
    system: PenalizedSystem,
    opt,
    reml: bool,
    free=None,
    singular_names: list[str] | None = None,
    optimized: PenalizedSystem | None = None,
) -> LmmFit:
    """The fit at the optimizer's end point `opt` (an OptimizationResult, however it was found: fit_system's
    optimizer, or fit/many.py's batched steps): solved there (on `optimized`, the system the optimizer worked on,
    where that was system's merged_system), a residual variance of zero refused, lme4's singular-fit warning
    given."""
    fit = build_fit(system, opt, reml, free, optimized)
    checks.check_residual_variance(fit.sigma2, system.cross.n, system.cross.yty / max(system.cross.n, 1))
    if singular_names is not None:
        warn_if_singular(fit, singular_names)
    return fit


def fit_lmm(
    X: np.ndarray,
    y: np.ndarray,
    terms: list[RandomTerm],
    reml: bool = True,
    weights=None,
    start_theta=None,
    free=None,
    maxiter: int = 10_000,
    gtol: float = 1e-7,
    method: str = DEFAULT_OPTIMIZER,
    progress=None,
    singular_names: list[str] | None = None,
) -> LmmFit:
    """A linear mixed model from arrays: fixed effects X, response y, random-effect terms (core.terms), prior
    weights. From the default start as fit_system chooses it, with the rows' moments (and pilot) offered."""
    system = build_system(X, y, terms, weights=weights)
    pilot = None if start_theta is not None else (lambda: pilot_start(system, X, y, list(terms), weights, reml))
    return fit_system(
        system,
        reml=reml,
        start_theta=start_theta,
        free=free,
        maxiter=maxiter,
        gtol=gtol,
        method=method,
        progress=progress,
        pilot=pilot,
        singular_names=singular_names,
        moments=row_moments(system, X, y, terms, weights),
    )


def row_moments(system: PenalizedSystem, X: np.ndarray, y: np.ndarray, terms, weights) -> Moments:
    """A door's `moments` for fit_system from its rows (pilot.moment_start), `system` being built from them."""
    return lambda optimized, reml: moment_start(
        X, y, list(terms), weights, system.cross.beta_ols, optimized.supports_hessian, reml
    )
