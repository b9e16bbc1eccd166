"""Minimise the profiled deviance over theta: bounds, fixed entries, convergence and singularity checks, log.

The deviance is cheap (its cost does not grow with n) and smooth inside the bounds, so a quasi-Newton
method with finite-difference gradients (scipy's L-BFGS-B) converges in few iterations; the bounds keep
the diagonal of every covariance template >= 0, which is where boundary (singular) fits live.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import minimize

__all__ = ["OptimizationResult", "minimize_deviance", "SINGULAR_TOLERANCE"]

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
                      free: np.ndarray | None = None, maxiter: int = 1000, gtol: float = 1e-7,
                      method: str = "L-BFGS-B", progress: Callable[[int, float, float], None] | None = None
                      ) -> OptimizationResult:
    """Minimise `objective(theta)` subject to theta >= lower; entries with free == False stay at start."""
    start = np.asarray(start, dtype=float)
    free = np.ones(start.shape, dtype=bool) if free is None else np.asarray(free, dtype=bool)
    t0 = time.perf_counter()
    log = []
    count = [0]
    best = [np.inf]

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
            log.append((count[0], value, time.perf_counter() - t0))
            if progress is not None:
                progress(count[0], value, time.perf_counter() - t0)
        return value

    x0 = np.maximum(start[free], lower[free])
    if x0.size == 0:
        value = f(x0)
        return OptimizationResult(full(x0), value, count[0], True, "no free parameters", method,
                                  time.perf_counter() - t0, tuple(log))
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower[free]]
    res = minimize(f, x0, method=method, bounds=bounds,
                   options=_options(method, maxiter, gtol))
    theta = full(np.maximum(res.x, lower[free]))
    return OptimizationResult(theta, float(res.fun), count[0], bool(res.success), str(res.message), method,
                              time.perf_counter() - t0, tuple(log))


def _options(method: str, maxiter: int, gtol: float) -> dict:
    if method == "L-BFGS-B":
        return {"maxiter": maxiter, "gtol": gtol, "ftol": 1e-15, "maxls": 50}
    return {"maxiter": maxiter}


def singular_entries(theta: np.ndarray, on_diagonal: np.ndarray) -> np.ndarray:
    """Indices of diagonal template entries estimated at (numerically) zero."""
    return np.flatnonzero(on_diagonal & (np.abs(theta) < SINGULAR_TOLERANCE))
