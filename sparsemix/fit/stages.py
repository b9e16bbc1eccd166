"""The stages of a fit, public for users who want the deviance surface or another optimizer:

    build_system(X, y, terms)  ->  PenalizedSystem   (the deviance function: system.deviance(theta, reml))
    optimize_system(system, ...) -> OptimizationResult
    build_fit(system, opt, ...)  -> LmmFit

pipeline.py chains them (with the pilot start) for every front door.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from .. import checks
from ..core.coordinates import column_transform, system_columns
from ..core.cross_products import CrossProducts
from ..core.relcov import RelativeCovariance
from ..core.system import PenalizedSystem
from ..core.terms import RandomTerm, same_grouping_runs
from ..core.threads import blas_threads, single_threaded
from ..errors import ConvergenceWarning, SingularFitWarning
from .lmm_fit import LmmFit
from .optimize import DEFAULT_OPTIMIZER, DERIVATIVE_METHODS, OptimizationResult, minimize_deviance, warm_step
from .scoring import SCORING_MAX_ITERATIONS, SCORING_REFIT_TOLERANCE, SCORING_THETA_TOLERANCE, fit_by_scoring

__all__ = ["build_system", "optimize_system", "build_fit", "warn_if_singular"]


def build_system(
    X: np.ndarray, y: np.ndarray, terms: list[RandomTerm], weights=None, factorization: str | None = None
) -> PenalizedSystem:
    """`factorization`: None to time the candidates and pick, or one of PenalizedSystem's modes."""
    transforms = [column_transform(t) for t in terms]  # centred, scaled columns (coordinates.py)
    relcov = RelativeCovariance([(t.n_levels, t.template) for t in terms], transforms)
    with blas_threads(single_threaded(relcov.q)):
        cross = CrossProducts.compute(
            X, y, system_columns(terms, transforms), weights=weights, column_blocks=[t.n_levels * t.k for t in terms]
        )
        return PenalizedSystem(cross, relcov, factorization=factorization, diagonal_runs=same_grouping_runs(terms))


def optimize_system(
    system: PenalizedSystem,
    reml: bool = True,
    start_theta=None,
    free=None,
    maxiter=10_000,
    gtol=1e-7,
    method=DEFAULT_OPTIMIZER,
    progress=None,
    initial_step=None,
    polish=True,
    ftol=None,
) -> OptimizationResult:
    """Minimise system.deviance(theta, reml) from `start_theta` (lme4's start by default). `initial_step`: BOBYQA's
    first step per entry (optimize.warm_step for a start near the optimum); `polish`: the optimum to full
    precision (bootstrap refits and profiles skip it): with method "auto", Newton steps with the average
    information (scoring.py) where they apply (to 1e-9, or to 1e-6 without `polish`); for systems with the exact
    gradient (system.supports_gradient: held dense, or random slopes in the Schur form), L-BFGS-B with it (Newton
    steps with the gradient to finish), in the Schur form first Newton steps with it and the average information
    (system.supports_information; optimize.information_newton); otherwise BOBYQA and a final Newton step
    (optimize.newton_polish);
    `ftol`: BOBYQA's stopping rule (optimize.py)."""
    relcov = system.relcov
    reml = checks.check_bool(reml, "reml")
    maxiter = checks.check_count(maxiter, "maxiter")
    # every door's start passes here before any optimizer sees it (a NaN reaching nlopt corrupted memory)
    start = (
        relcov.start() if start_theta is None else checks.check_start(start_theta, relcov.lower_bounds, "start_theta")
    )
    with system.threads():
        used = 0
        auto = method in DERIVATIVE_METHODS
        scoring = auto and free is None and system.supports_scoring
        if auto:
            method = "bobyqa"  # where the steps do not apply, or give up
        if scoring:
            # without the polish (bootstrap refits) BOBYQA's own precision, ~1e-5, is all that is asked
            result, best, used = fit_by_scoring(
                system,
                start,
                reml,
                maxiter=min(maxiter, SCORING_MAX_ITERATIONS),
                progress=progress,
                tolerance=SCORING_THETA_TOLERANCE if polish else SCORING_REFIT_TOLERANCE,
            )
            if result is not None:
                return result
            if not np.array_equal(best, start):  # BOBYQA goes on from where the steps stopped
                start, initial_step = best, warm_step(best)
        # BOBYQA after steps that gave up: its evaluations are numbered on from theirs, in the log and progress
        numbered = (
            progress
            if not used or progress is None
            else (lambda evaluation, deviance, seconds: progress(evaluation + used, deviance, seconds))
        )
        # The optimizer works on centred and scaled columns (coordinates.py), except where entries of theta are
        # held fixed: those are fixed in the reported coordinates.
        working = relcov.transformed and free is None
        hessian = auto and free is None and system.supports_hessian  # (exact Hessians: small systems held dense)
        if working:
            start = relcov.start() if start_theta is None else relcov.working_theta(start)
            initial_step = None if initial_step is None else warm_step(start)
        opt = minimize_deviance(
            lambda th: system.working_deviance(th, reml) if working else system.deviance(th, reml),
            start,
            relcov.lower_bounds,
            free=free,
            maxiter=max(maxiter - used, 1),
            gtol=gtol,
            method=method,
            progress=numbered,
            initial_step=initial_step,
            polish=polish,
            ftol=ftol,
            boundary_probes=relcov.boundary_probes,
            # the exact gradient (core/gradient.py) of small systems held dense, in the optimizer's coordinates
            deviance_gradient=(
                (lambda th: system.working_deviance_gradient(th, reml))
                if auto and free is None and system.supports_gradient
                else None
            ),
            deviance_information=(
                (lambda th: system.working_information(th, reml))
                if auto and free is None and system.supports_information
                else None
            ),
            deviance_hessian=(lambda th: system.working_deviance_hessian(th, reml)) if hessian else None,
            column_diagonals=relcov.column_diagonals if hessian else None,
        )
        if working:  # the solution at the optimum is read off an evaluation in the working coordinates
            reported = system.evaluate_working(opt.theta).theta
            assert reported is not None  # evaluate_working reports theta unless told not to
            opt = replace(opt, theta=reported, working_theta=opt.theta)
    if not used:
        return opt
    return replace(
        opt,
        n_evaluations=opt.n_evaluations + used,
        log=tuple((evaluation + used, deviance, seconds) for evaluation, deviance, seconds in opt.log),
    )


def build_fit(
    system: PenalizedSystem, opt: OptimizationResult, reml: bool, free=None, optimized: PenalizedSystem | None = None
) -> LmmFit:
    """The fit at the optimizer's theta: the penalized system solved there (fixed effects, conditional modes,
    residual variance) as an LmmFit. `free`: which theta entries the optimizer moved (all by default).
    `optimized`: the system the optimizer worked on, where that was system's merged_system (pipeline.
    optimized_system): solved there. Warns ConvergenceWarning when the optimizer stopped before converging."""
    free = np.ones(system.relcov.n_theta, bool) if free is None else np.asarray(free, bool)
    with system.threads():
        fit = LmmFit(system, system.solution_from(optimized or system, opt.theta, reml), opt, reml, free)
    if not fit.converged:
        warnings.warn(
            f"the optimizer ({opt.method}) did not converge after {opt.n_evaluations} deviance "
            f"evaluations: {opt.message}. Try a larger maxiter, or other start_params.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return fit


def warn_if_singular(fit: LmmFit, names: list[str]) -> None:
    """lme4's singular-fit warning, saying which variance is zero or which covariance matrix lost rank (a zero
    diagonal entry of a correlated term's template is not a zero variance but a perfect correlation)."""
    if not fit.is_singular:
        return
    parts = []
    relcov = fit.system.relcov
    for (_, template), sl in zip(relcov.blocks, relcov.theta_slices):
        zero = [i for i in fit.singular if sl.start <= i < sl.stop]
        if not zero:
            continue
        if template.is_diagonal:
            parts.append(", ".join(names[i] for i in zero) + " estimated at zero")
        else:
            diagonal = [sl.start + a for a, (i, j) in enumerate(template.positions) if i == j]
            parts.append(
                f"the covariance matrix of {', '.join(names[i] for i in diagonal)} is singular (rank "
                f"{template.k - len(zero)} of {template.k})"
            )
    warnings.warn(
        f"boundary (singular) fit: {'; '.join(parts)}. The model is overparameterized for these data; "
        "consider removing that random effect (or its correlations).",
        SingularFitWarning,
        stacklevel=3,
    )
