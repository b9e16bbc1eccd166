"""Minimise the profiled deviance over theta: bounds, fixed entries, convergence and singularity checks, log.

The deviance is cheap (its cost does not grow with n) but has no gradient here, so the default is nlopt's
BOBYQA, the bounded derivative-free quadratic-model method lme4 uses. Measured on the seed designs,
sleepstudy and a 6-parameter synthetic model, it needed 30-60% fewer evaluations than scipy's L-BFGS-B with
finite differences, reached the same or a lower deviance, and did not wander off to theta ~ 1e9 where
L-BFGS-B's line search did. scipy's L-BFGS-B, Powell and Nelder-Mead remain available by name. The bounds
keep the diagonal of every covariance template >= 0, which is where boundary (singular) fits live.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import nlopt
import numpy as np
from scipy.optimize import minimize

__all__ = ["OptimizationResult", "minimize_deviance", "SINGULAR_TOLERANCE", "OPTIMIZERS", "DEFAULT_OPTIMIZER"]

DEFAULT_OPTIMIZER = "bobyqa"
OPTIMIZERS = ("bobyqa", "L-BFGS-B", "Powell", "Nelder-Mead")
# Accepted spellings (statsmodels', scipy's, lme4's) of the optimizers above.
_METHOD_NAMES = {"bobyqa": "bobyqa", "nloptwrap": "bobyqa", "lbfgs": "L-BFGS-B", "l-bfgs-b": "L-BFGS-B",
                 "powell": "Powell", "nm": "Nelder-Mead", "nelder-mead": "Nelder-Mead", "nelder_mead": "Nelder-Mead"}
# Unbounded methods statsmodels offers: they cannot keep variances >= 0, so BOBYQA is used instead.
UNBOUNDED_METHODS = {"bfgs", "cg", "newton", "ncg", "basinhopping", "minimize"}


def resolve_method(name) -> str:
    """The optimizer for a user's method name; unknown names raise an InputError listing the choices."""
    from .errors import InputError

    if name is None:
        return DEFAULT_OPTIMIZER
    key = str(name).lower()
    if key in _METHOD_NAMES:
        return _METHOD_NAMES[key]
    raise InputError(f"optimizer {name!r} is not available; use 'bobyqa' (default), 'lbfgs', 'powell' or 'nm'.")


def warm_step(theta: np.ndarray) -> np.ndarray:
    """BOBYQA's first step when starting near an optimum (a refit, a profile point): 10% of each entry.
    From the REML optimum of sleepstudy, the ML refit took 38 evaluations with it and 96 with the cold step."""
    return 0.1 * np.maximum(np.abs(np.asarray(theta, dtype=float)), 0.1)

# lme4's isSingular() tolerance: a diagonal template entry below this counts as a zero variance.
SINGULAR_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OptimizationResult:
    theta: np.ndarray
    deviance: float
    n_evaluations: int
    converged: bool
    message: str
    method: str
    seconds: float
    log: tuple = field(default=(), repr=False)   # (evaluation, deviance, elapsed seconds) per improvement


def minimize_deviance(objective: Callable[[np.ndarray], float], start: np.ndarray, lower: np.ndarray,
                      free: np.ndarray | None = None, maxiter: int = 10_000, gtol: float = 1e-7,
                      method: str = DEFAULT_OPTIMIZER, progress: Callable[[int, float, float], None] | None = None,
                      upper: np.ndarray | None = None, initial_step: np.ndarray | None = None) -> OptimizationResult:
    """Minimise `objective(theta)` subject to lower <= theta <= upper; entries with free == False stay at start.

    `initial_step` (BOBYQA's first trust-region radius per entry) defaults to 0.75 max(|start|, 1), right for
    theta's relative scale; parameters on other scales (profiles over sd, sigma) should pass their own."""
    start = np.asarray(start, dtype=float)
    upper = np.full(start.shape, np.inf) if upper is None else np.asarray(upper, dtype=float)
    free = np.ones(start.shape, dtype=bool) if free is None else np.asarray(free, dtype=bool)
    t0 = time.perf_counter()
    log = []
    count = [0]
    best = [np.inf]
    best_x = [None]

    def full(x):
        theta = start.copy()
        theta[free] = x
        return theta

    def f(x):
        value = objective(full(x))
        count[0] += 1
        if not np.isfinite(value):
            value = 1e300  # outside the region the deviance is defined: push the optimizer back
        if value < best[0]:
            best[0] = value
            best_x[0] = np.array(x, dtype=float)
            log.append((count[0], value, time.perf_counter() - t0))
            if progress is not None:
                progress(count[0], value, time.perf_counter() - t0)
        return value

    x0 = np.clip(start[free], lower[free], upper[free])
    if x0.size == 0:
        value = f(x0)
        return OptimizationResult(full(x0), value, count[0], True, "no free parameters", method,
                                  time.perf_counter() - t0, tuple(log))
    if method == "bobyqa":
        step = None if initial_step is None else np.asarray(initial_step, dtype=float)[free]
        converged, message = _bobyqa(f, x0, lower[free], upper[free], maxiter, step)
        x, value = best_x[0], best[0]
    else:
        bounds = [(lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
                  for lo, hi in zip(lower[free], upper[free])]
        res = minimize(f, x0, method=method, bounds=bounds, options=_scipy_options(method, maxiter, gtol))
        x, value, converged, message = res.x, float(res.fun), bool(res.success), str(res.message)
    theta = full(np.clip(x, lower[free], upper[free]))
    return OptimizationResult(theta, value, count[0], converged, message, method, time.perf_counter() - t0,
                              tuple(log))


# Stopping rule for BOBYQA: a change of the deviance (-2 log L) below 1e-10, or of every theta entry below
# 1e-8, ends the search; both are far below what a likelihood-ratio or a reported digit can see.
BOBYQA_FTOL_ABS = 1e-10
BOBYQA_XTOL_ABS = 1e-8


def _bobyqa(f, x0, lower, upper, maxeval, step=None):
    opt = nlopt.opt(nlopt.LN_BOBYQA, x0.shape[0])
    opt.set_min_objective(lambda x, grad: f(x))
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_abs(BOBYQA_FTOL_ABS)
    opt.set_xtol_abs(BOBYQA_XTOL_ABS)
    opt.set_maxeval(int(maxeval))
    step = 0.75 * np.maximum(np.abs(x0), 1.0) if step is None else step
    room = np.maximum(x0 - lower, upper - x0)          # BOBYQA needs its first step inside the box
    opt.set_initial_step(np.where(np.isfinite(room), np.minimum(step, 0.5 * room), step))
    try:
        opt.optimize(x0)
    except nlopt.RoundoffLimited:
        # Progress stopped at rounding level: the best point seen is as good as the arithmetic allows.
        return True, "stopped at rounding level"
    code = opt.last_optimize_result()
    converged = code in (nlopt.FTOL_REACHED, nlopt.XTOL_REACHED, nlopt.SUCCESS, nlopt.STOPVAL_REACHED)
    message = {nlopt.FTOL_REACHED: "deviance change below ftol_abs", nlopt.XTOL_REACHED: "theta change below "
               "xtol_abs", nlopt.MAXEVAL_REACHED: f"stopped after maxiter={maxeval} evaluations"}.get(code, f"nlopt "
                                                                                                     f"code {code}")
    return converged, message


def _scipy_options(method: str, maxiter: int, gtol: float) -> dict:
    if method == "L-BFGS-B":
        return {"maxiter": maxiter, "gtol": gtol, "ftol": 1e-15, "maxls": 50}
    return {"maxiter": maxiter}


def singular_entries(theta: np.ndarray, on_diagonal: np.ndarray) -> np.ndarray:
    """Indices of diagonal template entries estimated at (numerically) zero."""
    return np.flatnonzero(on_diagonal & (np.abs(theta) < SINGULAR_TOLERANCE))
