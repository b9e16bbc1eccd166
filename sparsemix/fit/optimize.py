"""Minimise the profiled deviance over theta: bounds, fixed entries, convergence and singularity checks, log.

Variance-components models on crossed designs have a score and an average information matrix (scoring.py),
and the default, "auto", takes Newton steps with those (stages.optimize_system). Small systems held dense have
the exact gradient of the deviance (core/gradient.py), and "auto" runs scipy's L-BFGS-B with it (a quarter to a
tenth of BOBYQA's evaluations; 18 for sleepstudy where BOBYQA and its polish took 65), its Newton polish with a
Hessian from differences of the gradient; where the exact Hessian is at hand too (systems held whole, one term with
slopes), Newton steps with it come first (even_newton), and a model with one variance (a random intercept alone)
takes safeguarded Newton steps along it (scalar_newton: scipy's fixed cost per call was most of such a fit).
For every other model, and where those give up, the deviance is all there is, and the optimizer is nlopt's
BOBYQA, the bounded derivative-free quadratic-model method lme4 uses. Measured on the seed designs,
sleepstudy and a 6-parameter synthetic model, it needed 30-60% fewer evaluations than scipy's L-BFGS-B with
finite differences, reached the same or a lower deviance, and did not wander off to theta ~ 1e9 where
L-BFGS-B's line search did. scipy's L-BFGS-B, Powell and Nelder-Mead remain available by name. The bounds
keep the diagonal of every covariance template >= 0, which is where boundary (singular) fits live.
A fit ends with Newton steps on finite differences (newton_polish): BOBYQA leaves theta ~1e-5 from the optimum
along flat directions, at a point that depends on its path; the steps put it at the stationary point to ~1e-9.
An end point on the boundary is then checked to be a minimum there (release_bounds), and scipy's methods are
always followed by BOBYQA: each of them was seen to stop at a worse boundary point and report success.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import nlopt
import numpy as np
import scipy.linalg as la

__all__ = ["OptimizationResult", "minimize_deviance", "SINGULAR_TOLERANCE", "OPTIMIZERS", "DEFAULT_OPTIMIZER"]

# "auto": Newton steps with the average information (scoring.py) where the model allows them, L-BFGS-B with the
# exact gradient (core/gradient.py) for small systems held dense, else BOBYQA.
DEFAULT_OPTIMIZER = "auto"
# The name a fit by L-BFGS-B with the exact gradient reports (as "scoring" and "bobyqa" do); a refit given it goes
# the "auto" way again.
GRADIENT_METHOD = "gradient"
OPTIMIZERS = ("auto", "bobyqa", "L-BFGS-B", "Powell", "Nelder-Mead")
# The method names that take the system's derivatives where it has them (the default's, and what its fits report)
DERIVATIVE_METHODS = ("auto", "scoring", GRADIENT_METHOD)
# Accepted spellings (statsmodels', scipy's, lme4's) of the optimizers above.
_METHOD_NAMES = {
    "auto": "auto",
    "scoring": "auto",
    "bobyqa": "bobyqa",
    "nloptwrap": "bobyqa",
    "lbfgs": "L-BFGS-B",
    "l-bfgs-b": "L-BFGS-B",
    "powell": "Powell",
    "nm": "Nelder-Mead",
    "nelder-mead": "Nelder-Mead",
    "nelder_mead": "Nelder-Mead",
}
# Unbounded methods statsmodels offers: they cannot keep variances >= 0, so BOBYQA is used instead.
UNBOUNDED_METHODS = {"bfgs", "cg", "newton", "ncg", "basinhopping", "minimize"}


def resolve_method(name) -> str:
    """The optimizer for a user's method name; unknown names raise an InputError listing the choices."""
    from ..errors import InputError

    if name is None:
        return DEFAULT_OPTIMIZER
    key = str(name).lower()
    if key in _METHOD_NAMES:
        return _METHOD_NAMES[key]
    raise InputError(f"optimizer {name!r} is not available; use 'auto' (default), 'bobyqa', 'lbfgs', 'powell' or 'nm'.")


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
    log: tuple = field(default=(), repr=False)  # (evaluation, deviance, elapsed seconds) per improvement
    working_theta: np.ndarray | None = field(default=None, repr=False)  # theta in the optimizer's coordinates


def minimize_deviance(
    objective: Callable[[np.ndarray], float],
    start: np.ndarray,
    lower: np.ndarray,
    free: np.ndarray | None = None,
    maxiter: int = 10_000,
    gtol: float = 1e-7,
    method: str = DEFAULT_OPTIMIZER,
    progress: Callable[[int, float, float], None] | None = None,
    upper: np.ndarray | None = None,
    initial_step: np.ndarray | None = None,
    polish: bool = False,
    ftol: float | None = None,
    boundary_probes: Callable[[np.ndarray], list[tuple[np.ndarray, np.ndarray]]] | None = None,
    deviance_gradient: Callable[[np.ndarray], tuple[float, np.ndarray]] | None = None,
    deviance_information: Callable[[np.ndarray], np.ndarray | None] | None = None,
    deviance_hessian: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray | None]] | None = None,
    column_diagonals: np.ndarray | None = None,
) -> OptimizationResult:
    """Minimise `objective(theta)` subject to lower <= theta <= upper; entries with free == False stay at start.

    `initial_step` (BOBYQA's first trust-region radius per entry) defaults to 0.75 max(|start|, 1), right for
    theta's relative scale; parameters on other scales (profiles over sd, sigma) should pass their own.
    `polish`: finish with Newton steps (newton_polish) so that theta is determined to ~1e-9, not ~1e-5.
    `ftol`: BOBYQA's stopping change of the objective (default: 1e-8 before a polish, 1e-10 without).
    `boundary_probes`: with it, an end point with zero variances is checked to be a minimum on that boundary too
    (release_bounds), and left if it is not; only where every entry is free.
    scipy's methods are followed by BOBYQA from their end point: they can stop short, or at a worse boundary
    point, and still report success.
    `deviance_gradient` (theta -> (deviance, exact gradient)), with method "bobyqa" or "auto": L-BFGS-B with that
    gradient instead (a quarter to a tenth of BOBYQA's evaluations on random-slope models), its polish Newton
    steps with a Hessian from differences of the gradient; where it does not converge, BOBYQA goes on from its
    best point. `deviance_information` (theta -> an approximation to the deviance's Hessian there, or None), with
    the gradient: Newton steps with it first (information_newton); where they settle no L-BFGS-B and no polish
    follow, where they stop short the polish finishes, and where they give up L-BFGS-B runs from the start.
    `deviance_hessian` (theta -> (deviance, gradient, exact Hessian or None)), with the gradient, for a deviance even
    in each column of theta's templates (`column_diagonals`: even_newton's) whose diagonal entries are bounded below
    by 0: Newton steps with it first (even_newton); where they settle, nothing follows (the end point is a strict
    local minimum)."""
    start = np.asarray(start, dtype=float)
    upper = np.full(start.shape, np.inf) if upper is None else np.asarray(upper, dtype=float)
    free = np.ones(start.shape, dtype=bool) if free is None else np.asarray(free, dtype=bool)
    t0 = time.perf_counter()
    log = []
    count = [0]
    best = [np.inf]
    best_x = [None]
    best_gradient = [None]  # fg's at best_x
    best_key = [b""]  # best_x's bytes: whether a point is the best one, without numpy's comparison (~4 us a call)
    last_key = [b""]  # the last point evaluated (its bytes)

    every = bool(free.all())

    def full(x):
        if every:  # (the callers keep no reference to it; best_x takes a copy)
            return np.asarray(x, dtype=float)
        theta = start.copy()
        theta[free] = x
        return theta

    def record(x, value, key):
        if key != last_key[0]:  # (fg right after f at the same point, as information_newton asks: one evaluation)
            count[0] += 1
        last_key[0] = key
        if not math.isfinite(value):
            value = 1e300  # outside the region the deviance is defined: push the optimizer back
        if value < best[0]:
            best[0] = value
            best_x[0] = np.array(x, dtype=float)
            best_key[0] = best_x[0].tobytes()
            best_gradient[0] = None  # (fg sets it; a value-only evaluation leaves it unknown)
            log.append((count[0], value, time.perf_counter() - t0))
            if progress is not None:
                progress(count[0], value, time.perf_counter() - t0)
        return value

    def f(x):
        return record(x, objective(full(x)), np.asarray(x, dtype=float).tobytes())

    def fg(x):
        key = np.asarray(x, dtype=float).tobytes()
        if best_gradient[0] is not None and key == best_key[0]:  # (the polish starts at the best point)
            return best[0], best_gradient[0].copy()
        value, gradient = deviance_gradient(full(x))
        value = record(x, value, key)
        gradient = np.asarray(gradient, dtype=float)
        gradient = gradient if every else gradient[free]
        # a sum is finite where every entry is (a few microseconds an evaluation less than np.isfinite's all)
        gradient = gradient if value < 1e300 and math.isfinite(gradient.sum()) else np.zeros_like(gradient)
        if key == best_key[0]:  # this point is the best so far (a copy: scipy may write into its own)
            best_gradient[0] = gradient.copy()
        return value, gradient

    x0 = np.clip(start[free], lower[free], upper[free])
    if x0.size == 0:
        value = f(x0)
        return OptimizationResult(
            full(x0), value, count[0], True, "no free parameters", method, time.perf_counter() - t0, tuple(log)
        )
    if ftol is None:
        ftol = BOBYQA_FTOL_ABS_BEFORE_POLISH if polish else BOBYQA_FTOL_ABS
    ftol_rel = BOBYQA_FTOL_REL_BEFORE_POLISH if polish else 0.0
    lo, hi = lower[free], upper[free]

    def bobyqa_from(x, step):
        """BOBYQA from x: (converged, message, best point so far, its value)."""
        left = maxiter - count[0]
        converged, message = (
            _bobyqa(f, x, lo, hi, left, step, ftol, ftol_rel)
            if left >= 1
            else (False, f"stopped after maxiter={maxiter} evaluations")
        )
        return converged, message, np.clip(best_x[0], lo, hi), best[0]

    settled_by_newton = [False]
    at_local_minimum = [False]  # even_newton's end point: no boundary probes

    def fgh(x):
        value, gradient, hessian = deviance_hessian(full(x))
        value = record(x, value, np.asarray(x, dtype=float).tobytes())
        return value, np.asarray(gradient, dtype=float), hessian

    def gradient_from(x, step=None):
        """Newton steps with the information where given, else (or where they stop short) L-BFGS-B with the exact
        gradient from x; BOBYQA from its best point where it does not converge."""
        if deviance_hessian is not None and every:
            reached, end, value = even_newton(fgh, x, maxiter - count[0], column_diagonals)
            if reached:
                settled_by_newton[0] = at_local_minimum[0] = True
                return True, "Newton steps with the exact Hessian", end, value
        if x.size == 1 and every:  # one variance (a random intercept alone): Newton steps along the line
            reached, end, value = scalar_newton(fg, x, lo, hi, maxiter - count[0])
            if reached:
                settled_by_newton[0] = True
                return True, "Newton steps along theta's one entry", end, value
        if deviance_information is not None and every:
            reached, end, value = information_newton(f, fg, deviance_information, x, lo, hi, maxiter - count[0])
            if reached:  # "near": within rounding of the deviance, but not yet to 1e-9: the polish finishes
                settled_by_newton[0] = reached == "settled"
                # their end point, not the best value seen: near the optimum the values differ by rounding only,
                # and the lowest was 1e-8 from the stationary point the steps reached
                return True, "Newton steps with the average information", end, value
            # L-BFGS-B from the start, not from their best point: they give up near a boundary (a variance heading
            # for zero, perhaps the wrong one), where L-BFGS-B took longer (Exam's 3 x 3 term: 65 evaluations from
            # there, 42 from the start)
        for _ in range(LBFGS_RESTARTS):
            converged, message, end_value, slope = _lbfgs(fg, x, lo, hi, maxiter - count[0], polish)
            if not converged or (no_worse(end_value, best[0]) and slope <= _rounding_slope(end_value)):
                break
            # Again from the best point, with a fresh memory: it stopped at a stationary point worse than one it
            # passed (a zero variance, where the deviance is even in theta and its gradient 0, reached by a step cut
            # at a bound), or where its steps stopped gaining on a slope (a singular fit's flat valley).
            x = np.clip(best_x[0], lo, hi)
        x = np.clip(best_x[0], lo, hi)
        if converged and best[0] < 1e300:  # (no finite deviance seen: a zero gradient stood in for one)
            return converged, message, x, best[0]
        converged, then, x, value = bobyqa_from(x, warm_step(x))
        return converged, f"{message}; then bobyqa from its best point: {then}", x, value

    with_gradient = deviance_gradient is not None and method in ("bobyqa", "auto")
    go_on = gradient_from if with_gradient else bobyqa_from
    if with_gradient:
        converged, message, x, value = gradient_from(x0)
    elif method in ("bobyqa", "auto"):  # "auto" reaches here where the scoring steps do not apply
        converged, message, x, value = bobyqa_from(
            x0, None if initial_step is None else np.asarray(initial_step, float)[free]
        )
    else:
        bounds = [(a if np.isfinite(a) else None, b if np.isfinite(b) else None) for a, b in zip(lo, hi)]
        res = _scipy_minimize(f, x0, method=method, bounds=bounds, options=_scipy_options(method, maxiter, gtol))
        end = np.clip(best_x[0] if best_x[0] is not None else res.x, lo, hi)
        converged, message, x, value = bobyqa_from(end, warm_step(end))
        message = f"{method}: {res.message}; then bobyqa from its end point: {message}"
    polisher = (
        (lambda x, fx: gradient_polish(fg, x, fx, lo, hi))
        if with_gradient
        else (lambda x, fx: newton_polish(f, x, fx, lo, hi))
    )
    if polish and converged and not settled_by_newton[0]:  # (Newton's end point is the stationary point already)
        x, value = polisher(x, value)
    if boundary_probes is not None and converged and np.all(free) and not at_local_minimum[0]:
        x, value, converged, message = release_bounds(
            f,
            x,
            value,
            boundary_probes,
            go_on,
            polisher if polish else None,
            message,
            (lambda point, d: _slope(fg, point, d)) if with_gradient else None,
        )
    return OptimizationResult(
        full(x),
        value,
        count[0],
        converged,
        message,
        GRADIENT_METHOD if with_gradient else method,
        time.perf_counter() - t0,
        tuple(log),
    )


def _slope(fg, point, direction) -> float:
    """The deviance's change per unit of theta along `direction` at `point` (0 for a zero direction: a probe that
    rounding put back on the point)."""
    length = float(np.linalg.norm(direction))
    if not length > 0:
        return 0.0
    return float(fg(point)[1] @ direction) / length


def release_bounds(f, x, fx, boundary_probes, go_on, polish, message, slope=None):
    """Leave a boundary end point that is not a minimum there (lme4's and MixedModels.jl's boundary checks).

    `boundary_probes(x)` gives points a small step into the interior from each zero variance (a covariance
    that gains a direction it lacks at x: RelativeCovariance.boundary_probes), each with the representative of x
    it is a small step from: (start, probe) pairs. If one is lower than x, the optimizer
    goes on from it (`go_on(x, step)`; then `polish(x, fx)`, if given), and its end point is checked again.
    `slope(point, direction)` (with the exact gradient): where no probe is lower, a point RELEASE_NEAR of the way
    to each probe where the deviance still falls along it counts too; the probes overshoot a minimum close to the
    boundary (a variance of 2.5e-5 relative to the residual's, 8e-5 below the boundary point, was missed)."""
    for _ in range(RELEASE_MAX_ROUNDS):
        best, best_value = None, fx - RELEASE_MIN_GAIN * max(1.0, abs(fx))
        probes = boundary_probes(x)
        for _, probe in probes:
            value = f(probe)
            if value < best_value:
                best, best_value = probe, value
        if best is None and slope is not None:
            for start, probe in probes:
                near = start + RELEASE_NEAR * (probe - start)
                if slope(near, probe - start) < -RELEASE_MIN_SLOPE:
                    best = near
                    break
        if best is None:
            return x, fx, True, message
        converged, message, x, fx = go_on(best, warm_step(best))
        message = f"{message} (after leaving a boundary point that was not a minimum)"
        if not converged:
            return x, fx, False, message
        if polish is not None:
            x, fx = polish(x, fx)
    return x, fx, True, message


# A probe must beat the end point by this much (relative) to count: far above rounding, far below what a
# likelihood-ratio test can see.
RELEASE_MIN_GAIN = 1e-9
RELEASE_MAX_ROUNDS = 3
# With the gradient: the near points' share of the way to a probe (its variance 1e-4 of the probe's), and the fall
# of the deviance per unit of theta along it that counts (ten times L-BFGS-B's stopping slope).
RELEASE_NEAR = 1e-2
RELEASE_MIN_SLOPE = 1e-4


# The polish's difference step, relative to max(|theta_i|, 1). The central-difference gradient's bias
# (h^2 f'''/6, ~2e-9) and rounding noise (eps |f| / h) are far below the ~1e-5 along flat directions that BOBYQA
# leaves, and the same function gives the same stationary point however its sums were ordered.
POLISH_STEP = 1e-4
# A Newton step longer than this many difference steps means BOBYQA did not stop near a quadratic optimum.
POLISH_MAX_STEPS = 100
# Newton steps repeat (with the first Hessian) while they move theta by more than this, relative: a step
# leaves ~1.6e-4 of itself (measured: 9e-6 -> 6e-10, 4.5e-5 -> 7e-9), so theta ends within ~2e-9. (3e-6 cost
# the seed designs 5 more evaluations each for nothing the 1e-8 tests can see.)
POLISH_REPEAT_ABOVE = 1e-5
POLISH_MAX_NEWTON_STEPS = 3


def newton_polish(f, x, fx, lower, upper):
    """Newton steps from BOBYQA's end point, with gradient and Hessian from finite differences.

    BOBYQA stops when the deviance changes by less than ftol, which leaves theta undetermined by about
    sqrt(2 ftol / f'') along flat directions (~1e-5): two fits of the same data with rows in another order
    (another rounding, another path) agreed only to that. Near an interior optimum the deviance is smooth, and
    Newton steps land at its stationary point to ~1e-9. Entries within two steps of a bound (zero variances)
    stay put. The first step costs p(p+3)/2 + 1 evaluations for p polished entries (central differences for the
    gradient and the Hessian's diagonal, forward ones for its off-diagonal), a repeat 2p + 1. A step is kept
    only if the Hessian is positive definite, the step short and the deviance not worse.
    """
    x, fx = _snap_to_lower_bounds(f, x, fx, lower)
    h = POLISH_STEP * np.maximum(np.abs(x), 1.0)
    moving = np.flatnonzero((x - lower > 2 * h) & (upper - x > 2 * h))
    if moving.size == 0:
        return x, fx
    hm = h[moving]

    def shifted(point, *moves):
        y = point.copy()
        for a, sign in moves:
            y[moving[a]] += sign * hm[a]
        return f(y)

    def central(point, f_point):
        plus = np.array([shifted(point, (a, 1)) for a in range(moving.size)])
        minus = np.array([shifted(point, (a, -1)) for a in range(moving.size)])
        return (plus - minus) / (2 * hm), (plus - 2 * f_point + minus) / hm**2, plus

    with np.errstate(invalid="ignore", over="ignore"):  # an infinite deviance nearby: checked below
        grad, diagonal, plus = central(x, fx)
        hess = np.diag(diagonal)
        for a in range(moving.size):
            for b in range(a):
                hess[a, b] = hess[b, a] = (shifted(x, (a, 1), (b, 1)) - plus[a] - plus[b] + fx) / (hm[a] * hm[b])
    if not (np.all(np.isfinite(hess)) and np.all(np.isfinite(grad))):
        return x, fx  # a deviance that is not finite near x (a residual variance near 0): nothing to polish
    return _newton_steps(
        x, fx, grad, hess, moving, hm, lower, upper, lambda y: (f(y), None), lambda y, fy, _: central(y, fy)[0]
    )


def _newton_steps(x, fx, grad, hess, moving, h, lower, upper, evaluate, gradient_at):
    """Up to POLISH_MAX_NEWTON_STEPS Newton steps on the `moving` entries with one Hessian: each kept only if it
    is finite, shorter than POLISH_MAX_STEPS difference steps `h` and not worse; repeated while it moves theta by
    more than POLISH_REPEAT_ABOVE. `evaluate(y)` -> (deviance, what gradient_at may reuse), `gradient_at(y, fy,
    that)` -> the gradient's moving entries, asked only before a repeat."""
    try:
        hess_factor = la.cho_factor(hess, check_finite=False)  # (finite: checked by the callers)
    except la.LinAlgError:
        return x, fx  # not a strict local minimum in these coordinates: leave it
    for _ in range(POLISH_MAX_NEWTON_STEPS):
        step = -la.cho_solve(hess_factor, grad, check_finite=False)
        if not np.all(np.isfinite(step)) or np.any(np.abs(step) > POLISH_MAX_STEPS * h):
            return x, fx
        y = x.copy()
        y[moving] = np.clip(x[moving] + step, lower[moving], upper[moving])
        fy, extra = evaluate(y)
        if not no_worse(fy, fx):
            return x, fx
        x, fx = y, fy
        if np.all(np.abs(step) <= POLISH_REPEAT_ABOVE * np.maximum(np.abs(x[moving]), 1.0)):
            break
        grad = gradient_at(x, fx, extra)
    return x, fx


# Newton steps with the information (information_newton): at most this many; the optimum is reached where a step
# would move every entry by less than INFORMATION_NEWTON_TOLERANCE (relative to max(|theta|, 1)) ...
INFORMATION_NEWTON_MAX_ITERATIONS = 15
INFORMATION_NEWTON_TOLERANCE = 1e-8
# A step shorter than this is the last, taken as the gradient gives it, the deviance unchecked (near its rounding:
# pastes' REML fit stood at 4e-8 and its line searches failed): the steps shrink by 1e-2 to 1e-3 a step there (the
# 1,000,000-row slopes design: 2.8e-3, 1.9e-4, 2.0e-6, 1.1e-9), so ~1e-7 is left. With an entry held, at most
# INFORMATION_NEWTON_MAX_SHORT such steps, each evaluated with its gradient.
INFORMATION_NEWTON_LAST_STEP = 1e-5
INFORMATION_NEWTON_MAX_SHORT = 4
INFORMATION_NEWTON_MAX_HALVINGS = 10
# A step goes at most this share of the way to a bound; after this many such cut steps in a row the steps give up
# (a variance heading for zero: L-BFGS-B goes on, and the snap puts it on the bound).
INFORMATION_NEWTON_BOUNDARY_FRACTION = 0.9
INFORMATION_NEWTON_MAX_CUTS = 2
# Steps each longer than this share of the one before, this many in a row: the information is a poor Hessian there
# (Dialyzer's singular 3 x 3 term, with an entry held at zero: 20 steps each ~0.6 of the last), and L-BFGS-B goes on.
INFORMATION_NEWTON_SLOW = 0.5
INFORMATION_NEWTON_MAX_SLOW = 3
# The secant correction follows full steps shorter than this (relative), as in fit/scoring.py.
INFORMATION_NEWTON_SECANT_MAX_STEP = 0.1
# sufficient decrease of a step: this share of what the gradient predicts (Armijo)
INFORMATION_NEWTON_ARMIJO = 1e-4


def secant_update(B: np.ndarray, delta: np.ndarray, change: np.ndarray) -> np.ndarray:
    """B updated (BFGS) so that it maps the step `delta` to the gradient's `change` along it; B itself where the
    curvature along the step is not positive."""
    curvature = float(delta @ change)
    Bd = B @ delta
    if curvature <= 1e-12 * float(delta @ Bd) or not np.isfinite(curvature):
        return B
    return B - np.outer(Bd, Bd) / float(delta @ Bd) + np.outer(change, change) / curvature


def information_newton(f, fg, information, x, lower, upper, maxeval: int) -> tuple[str, np.ndarray, float]:
    """Newton steps on the deviance with its exact gradient (fg: x -> (deviance, gradient)) and `information(x)`,
    an approximation to its Hessian at the point fg evaluated last (PenalizedSystem.working_information), corrected
    by the last short step's secant, halved until the deviance (f: x -> deviance, half the cost of fg on the Schur
    form; fg then reuses its factorization) falls. A step shorter than INFORMATION_NEWTON_LAST_STEP ends them at
    its end point, unchecked: the secant-corrected steps shrink superlinearly there, so what is left is about two
    orders below it. A variance heading for zero
    (INFORMATION_NEWTON_MAX_CUTS steps in a row cut short by its bound) is put on the bound where that is no worse
    and held there, the others going on; a held entry whose gradient then points inside is let go again.

    Returns (how, end point, its deviance): "settled" where a step would move every entry by less than
    INFORMATION_NEWTON_TOLERANCE (a stationary point of the entries not held) or after a step shorter than
    INFORMATION_NEWTON_LAST_STEP with none held; "near" after INFORMATION_NEWTON_MAX_SHORT such steps with an entry
    held (the polish's exact Newton steps finish); "" where they gave up (the information not available or not
    positive definite, a bound that is worse, no step that lowers the deviance, steps that shrink too slowly)."""
    x = np.asarray(x, dtype=float).copy()
    fx, gx = fg(x)
    used, cut, slow, short, previous, last = 1, 0, 0, 0, np.inf, None
    held = np.zeros(x.shape, dtype=bool)
    for _ in range(INFORMATION_NEWTON_MAX_ITERATIONS):
        if not np.isfinite(fx) or fx >= 1e300:
            return "", x, fx
        H = information(x)
        if H is None or not np.all(np.isfinite(H)):
            return "", x, fx
        if last is not None:  # corrected by the last full short step's secant: the information alone converges
            H = secant_update(H, x - last[0], gx - last[1])  # linearly (~0.2 a step), too slowly for 1e-9
        free = ~held
        step = np.zeros(x.shape)
        try:
            step[free] = -la.cho_solve(la.cho_factor(H[np.ix_(free, free)]), gx[free])
        except la.LinAlgError:
            return "", x, fx
        length = float(np.max(np.abs(step) / np.maximum(np.abs(x), 1.0), initial=0.0))
        if not np.isfinite(length):
            return "", x, fx
        if length < INFORMATION_NEWTON_TOLERANCE:
            inward = held & (gx < -RELEASE_MIN_SLOPE)  # the deviance falls into the interior: let it go
            if not inward.any():
                return "settled", x, fx
            held &= ~inward
            last = None
            continue
        if length < INFORMATION_NEWTON_LAST_STEP:  # the deviance cannot judge a step this short: taken as given
            y = np.where(held, x, x + step)
            if not held.any():  # the last step (see above)
                fy = f(y) if used < maxeval else np.inf
                return ("settled", y, fy) if np.isfinite(fy) else ("settled", x, fx)
            fy, gy = fg(y)  # a held entry's gradient decides whether it is let go
            used += 1
            short += 1
            if not np.isfinite(fy) or short > INFORMATION_NEWTON_MAX_SHORT or used >= maxeval:
                return "near", (y if fy < fx else x), min(fy, fx)
            last = (x, gx)
            x, fx, gx = y, fy, gy
            continue
        slow = slow + 1 if length > INFORMATION_NEWTON_SLOW * previous else 0
        if slow >= INFORMATION_NEWTON_MAX_SLOW:
            return "", x, fx
        previous = length
        # at most INFORMATION_NEWTON_BOUNDARY_FRACTION of the way to a bound
        room = np.where(step < 0, (x - lower) / np.maximum(-step, 1e-300), (upper - x) / np.maximum(step, 1e-300))
        alpha = min(1.0, INFORMATION_NEWTON_BOUNDARY_FRACTION * float(room.min(initial=np.inf)))
        cut = cut + 1 if alpha < 1.0 else 0
        if cut > INFORMATION_NEWTON_MAX_CUTS:  # onto the bound that keeps cutting the steps, if no worse
            j = int(np.argmin(room))
            if step[j] >= 0 or not np.isfinite(lower[j]) or used >= maxeval:
                return "", x, fx
            y = x.copy()
            y[j] = lower[j]
            fy, gy = fg(y)
            used += 1
            if not (np.isfinite(fy) and no_worse(fy, fx)):
                return "", x, fx
            x, fx, gx, cut, last = y, fy, gy, 0, None
            held[j] = True
            continue
        full_step = alpha == 1.0
        for _ in range(INFORMATION_NEWTON_MAX_HALVINGS):
            if used >= maxeval:
                return "", x, fx
            y = np.where(held, x, x + alpha * step)
            fy = f(y)
            used += 1
            if fy <= fx + INFORMATION_NEWTON_ARMIJO * alpha * float(gx @ step):
                fy, gy = fg(y)  # (the factor is at y: only the gradient's own work)
                break
            alpha, full_step = alpha / 2, False
        else:
            return "", x, fx
        last = (x, gx) if full_step and length < INFORMATION_NEWTON_SECANT_MAX_STEP else None
        x, fx, gx = y, fy, gy
    return "", x, fx


# scalar_newton: at most this many steps; settled where a step moves theta by less than this (relative to
# max(|theta|, 1))
SCALAR_NEWTON_MAX_STEPS = 40
SCALAR_NEWTON_TOLERANCE = 1e-10


def scalar_newton(fg, x, lower, upper, maxeval: int) -> tuple[str, np.ndarray, float]:
    """The minimum of a deviance of one parameter on [lower, upper] by safeguarded Newton steps on its exact
    derivative: the second derivative from the last two derivatives (a difference step where none is known or it
    is not positive, and then, where the deviance is concave there, half the way toward the end it falls to), each
    step kept inside the interval where the derivative is known to change sign (bisecting it where a step leaves
    it) and halved until the deviance does not rise. Costs L-BFGS-B's evaluations or fewer, without its fixed cost
    per call (most of a small model's fit: 1 ms of dyestuff's 1.3), and ends at the stationary point to ~1e-10, so
    no polish follows. Returns ("settled" or "" where it gave up, end point, deviance there)."""
    lo, hi = float(lower[0]), float(upper[0])
    a = float(np.clip(x[0], lo, hi))
    used = 0

    def evaluate(t):
        nonlocal used
        used += 1
        value, gradient = fg(np.array([t]))
        return value, float(gradient[0])

    def usable(value, slope):
        return np.isfinite(value) and value < 1e300 and np.isfinite(slope)

    fa, ga = evaluate(a)
    if not usable(fa, ga):
        return "", np.array([a]), fa
    left, right = lo, hi  # the minimum lies between them: the derivative is < 0 left of it and > 0 right of it
    curvature = None
    for _ in range(SCALAR_NEWTON_MAX_STEPS):
        if ga > 0:
            right = min(right, a)
        elif ga < 0:
            left = max(left, a)
        if ga == 0 or (ga > 0 and a <= lo) or (ga < 0 and a >= hi):
            return "settled", np.array([_on_bound(a, lo)]), fa  # stationary, or at a bound the deviance rises from
        scale = max(abs(a), 1.0)
        if curvature is None or not curvature > 0:  # a difference step toward the descent
            if used >= maxeval:
                return "", np.array([a]), fa
            b = float(np.clip(a + (1e-4 * scale if ga < 0 else -1e-4 * scale), left, right))
            fb, gb = evaluate(b)
            if not usable(fb, gb) or b == a:
                return "", np.array([a]), fa
            curvature = (gb - ga) / (b - a)
            if fb < fa:
                a, fa, ga = b, fb, gb
                if ga > 0:
                    right = min(right, a)
                elif ga < 0:
                    left = max(left, a)
        if curvature > 0:
            target = a - ga / curvature
        else:  # concave: half the way to the end of the bracket the deviance falls toward (an open end: 2 |a| + 2)
            end = left if ga > 0 else right
            target = 0.5 * (a + end) if np.isfinite(end) else a + np.copysign(2 * (abs(a) + 1.0), -ga)
            curvature = None
        if target <= left:  # at the bound itself where the bracket ends there (a zero variance), else bisect
            target = lo if left == lo else 0.5 * (left + a)
        elif target >= right:
            target = hi if right == hi else 0.5 * (a + right)
        if abs(target - a) <= SCALAR_NEWTON_TOLERANCE * scale:
            return "settled", np.array([_on_bound(a, lo)]), fa
        for _ in range(INFORMATION_NEWTON_MAX_HALVINGS):
            if used >= maxeval:
                return "", np.array([a]), fa
            fb, gb = evaluate(target)
            if usable(fb, gb) and no_worse(fb, fa):
                break
            target = 0.5 * (a + target)  # the deviance rose: half the step
        else:
            return "", np.array([a]), fa
        secant = (gb - ga) / (target - a)
        curvature = secant if curvature is not None or secant > 0 else None
        a, fa, ga = target, fb, gb
    return "", np.array([a]), fa


# even_newton: at most this many steps; settled where a step moves every entry by less than HESSIAN_NEWTON_TOLERANCE
# (relative to max(|x_i|, 1)), or after a step shorter than HESSIAN_NEWTON_LAST_STEP, taken without evaluating its
# end (the deviance cannot judge a step so short, and a Newton step from that close lands within ~1e-12);
# eigenvalues of the Hessian below HESSIAN_NEWTON_MIN_EIGENVALUE of the largest count as not positive; no step
# moves an entry by more than HESSIAN_NEWTON_MAX_MOVE times max(|x|, 1) (far from the optimum, where the deviance
# flattens as a variance grows, a Newton step can leave theta's scale; 0.75, not 1: from lme4's start of 1 a step
# capped at 1 put an entry exactly on 0, a saddle where its gradient vanishes).
HESSIAN_NEWTON_MAX_STEPS = 50
HESSIAN_NEWTON_TOLERANCE = 1e-10
HESSIAN_NEWTON_LAST_STEP = 1e-6
HESSIAN_NEWTON_MIN_EIGENVALUE = 1e-10
HESSIAN_NEWTON_MAX_MOVE = 0.75
# A variance's entry below this that a step would double or more where the deviance curves down (twice in a row)
# is tried first where a Newton step in its variance takes it (_variance_newton), or at this value where that step
# does not apply, at most HESSIAN_NEWTON_DESCENT_TRIALS times a fit
HESSIAN_NEWTON_DESCENT = 0.1
HESSIAN_NEWTON_DESCENT_TRIALS = 2
# ... and settled where the full Newton step's predicted decrease is below this fraction of the deviance
HESSIAN_NEWTON_RESOLUTION = 1e-14
_TINY_FLOAT = float(np.finfo(float).tiny)
_POSV = la.get_lapack_funcs("posv", (np.zeros((1, 1)),))  # Cholesky and solve in one LAPACK call (~3 us)


def even_newton(fgh, x, maxeval: int, column_diagonals: np.ndarray | None = None) -> tuple[str, np.ndarray, float]:
    """The minimum of a deviance that depends on each template column only up to its sign (variance components:
    D(theta) = D(|theta|); templates: D depends on T T'), by Newton steps with its exact Hessian (fgh: a folded x
    -> (deviance, gradient, Hessian or None)) on the unconstrained function: a variance whose optimum is zero is an
    entry the steps take to 0 (its curvature there, 2 dD/dtau, is positive), with no bound to cut them. The
    Hessian's eigenvalues are taken by their absolute values where it is not positive definite (and a saddle's
    negative direction followed where the gradient vanishes: a zero variance the deviance falls from), each step
    halved until the deviance falls. Returns ("settled" where the Hessian is positive definite and the next step
    shorter than HESSIAN_NEWTON_TOLERANCE (or, shorter than HESSIAN_NEWTON_LAST_STEP, taken unevaluated), or ""
    where it gave up; the folded end point; its deviance).
    Ends at a strict local minimum, so no polish and no boundary probes are needed after it.
    `column_diagonals` (RelativeCovariance.column_diagonals): each entry is folded with the sign of its column's
    diagonal entry, so the diagonal ends >= 0 (by default every entry is its own column: variance components)."""
    used = 0
    diagonals = np.arange(np.size(x)) if column_diagonals is None else np.asarray(column_diagonals)

    def evaluate(y):
        nonlocal used
        used += 1
        sign = np.where(y[diagonals] < 0, -1.0, 1.0)
        value, gradient, hessian = fgh(sign * y)
        if hessian is None or not (np.isfinite(value) and value < 1e300):
            return np.inf, None, None
        return value, gradient * sign, hessian * (sign[:, None] * sign)

    x = np.asarray(x, dtype=float).copy()
    fx, gx, H = evaluate(x)
    curved_down, trials = False, 0  # (whether the last point's Hessian had a negative eigenvalue; descent trials)
    on_diagonal = diagonals == np.arange(np.size(x))  # the templates' diagonal entries: standard deviations
    for _ in range(HESSIAN_NEWTON_MAX_STEPS):
        if H is None or not math.isfinite(float(H.sum() + gx.sum())):
            return "", _folded(x, diagonals), fx
        _, step, info = _POSV(H, -gx)  # positive definite (info 0): the Newton step
        positive, vectors = info == 0, None
        scale = np.maximum(np.abs(x), 1.0)
        if not positive:  # else with the eigenvalues' absolute values
            eigenvalues, vectors = np.linalg.eigh(H)
            floor = HESSIAN_NEWTON_MIN_EIGENVALUE * max(float(np.abs(eigenvalues).max()), _TINY_FLOAT)
            positive = bool(eigenvalues[0] > floor)
            step = -vectors @ ((vectors.T @ gx) / np.maximum(np.abs(eigenvalues), floor))
            if curved_down and not positive and trials < HESSIAN_NEWTON_DESCENT_TRIALS and used < maxeval:
                # a variance near zero that the step would double or more, where the deviance curved down at the last
                # point too, is leaving a saddle, by steps of |slope / curvature| that only double it (ten steps from
                # 1e-4 to 0.1 on egsingle's children in 8 schools): tried first where a Newton step in its variance
                # takes it, taken where the deviance falls below the ordinary step's model there
                leaving = on_diagonal & (np.abs(x) < HESSIAN_NEWTON_DESCENT) & (step * x >= x * x) & (x != 0)
                if leaving.any():
                    trials += 1
                    y = x + step
                    y[leaving] = np.sign(x[leaving]) * _variance_newton(x[leaving], gx[leaving], np.diag(H)[leaving])
                    fy, gy, Hy = evaluate(y)
                    if fy < fx + 0.5 * float(gx @ step):  # (below the ordinary step's linear prediction's half)
                        x, fx, gx, H = y, fy, gy, Hy
                        continue
            curved_down = not positive
        else:
            curved_down = False
        length = float(np.max(np.abs(step) / scale))
        if length < HESSIAN_NEWTON_TOLERANCE:
            if positive:
                return "settled", _settled(x, diagonals), fx
            # a saddle (a zero variance the deviance falls from, where the gradient vanishes): its negative
            # direction, as far as theta's scale
            assert vectors is not None
            step = vectors[:, 0] * float(np.max(scale))
            length = float(np.max(np.abs(step) / scale))
        if length > HESSIAN_NEWTON_MAX_MOVE:
            step *= HESSIAN_NEWTON_MAX_MOVE / length
        if length < HESSIAN_NEWTON_LAST_STEP and positive:  # quadratic convergence: it lands within ~length^2
            return "settled", _settled(x + step, diagonals), fx  # (fx: the deviance before it, within rounding)
        alpha, slope = 1.0, float(gx @ step)
        if positive and -0.5 * slope <= HESSIAN_NEWTON_RESOLUTION * abs(fx):
            # what the Newton step would gain is below the deviance's rounding: no halving could see it fall (a
            # boundary optimum reached from a start near zero variances ran 35 more evaluations at one point)
            return "settled", _settled(x + step, diagonals), fx
        for _ in range(INFORMATION_NEWTON_MAX_HALVINGS):
            if used >= maxeval:
                return "", _folded(x, diagonals), fx
            y = x + alpha * step
            fy, gy, Hy = evaluate(y)
            if fy <= fx + INFORMATION_NEWTON_ARMIJO * alpha * min(slope, 0.0) and fy < fx:
                break
            if alpha == 1.0 and positive and gy is not None and _gradient_judges(fx, fy, gx, gy):
                break
            alpha /= 2
        else:
            return "", _folded(x, diagonals), fx
        x, fx, gx, H = y, fy, gy, Hy
    return "", _folded(x, diagonals), fx


# A full Newton step whose end is within this (relative) of the deviance before it, where the gradient falls to
# HESSIAN_NEWTON_GRADIENT_DROP of its size or less, is taken: the deviance's rounding cannot judge it, the gradient can
# (a near-singular 3 x 3 growth curve: the step to a gradient of 4e-9 from 1e-5 ended 5e-13 above its start; every
# halving was refused, and L-BFGS-B took 80 evaluations to confirm the point)
HESSIAN_NEWTON_ROUNDING = 1e-12
HESSIAN_NEWTON_GRADIENT_DROP = 0.01


def _gradient_judges(fx: float, fy: float, gx: np.ndarray, gy: np.ndarray) -> bool:
    """Whether a full Newton step from (fx, gx) to (fy, gy) is taken on the gradient's word (see above)."""
    if not abs(fy - fx) <= HESSIAN_NEWTON_ROUNDING * max(abs(fx), 1.0):
        return False
    return float(np.max(np.abs(gy))) <= HESSIAN_NEWTON_GRADIENT_DROP * float(np.max(np.abs(gx)))


def _variance_newton(x: np.ndarray, gradient: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    """Where each entry x_j of a deviance even in it (a standard deviation near zero) goes by a Newton step in its
    variance tau = x_j^2 alone: D'(tau) = g / 2x, D''(tau) = (H_jj - 2 D'(tau)) / 4x^2, where that is a descent to a
    finite tau (D' < 0 < D''), else to HESSIAN_NEWTON_DESCENT. In tau a variance component's deviance is near
    quadratic where in x it curves down (MathAchieve's SES slopes beside minority: from 0.002 the optimum's 0.067,
    where 0.1 was above the deviance and the steps doubled it five times)."""
    slope = gradient / (2.0 * x)
    curve = (curvature - 2.0 * slope) / (4.0 * x * x)
    descent = (slope < 0) & (curve > 0) & np.isfinite(slope) & np.isfinite(curve)
    tau = x * x - np.divide(slope, curve, out=np.zeros_like(slope), where=descent)
    return np.where(descent & (tau > 0), np.sqrt(np.abs(tau)), HESSIAN_NEWTON_DESCENT)


# A settled entry this close to its bound (relative to max(|x|, 1)) is on it: the steps approach a zero variance
# quadratically but reach it only by rounding (Dyestuff2: 3.6e-6, 6.4e-10, 1.5e-20), and the deviance there differs
# from the bound's by far less than rounding (its slope in theta vanishes at a zero variance).
BOUND_SNAP = 1e-9


def _on_bound(x, lower):
    """x with entries within BOUND_SNAP of `lower` (a number) put on it."""
    if np.ndim(x) == 0:
        return lower if 0 <= x - lower <= BOUND_SNAP * max(abs(x), 1.0) else x
    x = np.array(x, dtype=float)
    x[(x >= lower) & (x - lower <= BOUND_SNAP * np.maximum(np.abs(x), 1.0))] = lower
    return x


def _settled(x: np.ndarray, diagonals: np.ndarray) -> np.ndarray:
    """even_newton's end point: folded, its zero variances (diagonal entries, bounded below by 0) exactly 0."""
    end = _folded(x, diagonals)
    on_diagonal = diagonals == np.arange(end.size)
    end[on_diagonal] = _on_bound(end[on_diagonal], 0.0)
    return end


def _folded(x: np.ndarray, diagonals: np.ndarray) -> np.ndarray:
    return np.where(x[diagonals] < 0, -x, x)


def gradient_polish(fg, x, fx, lower, upper):
    """newton_polish with the exact gradient: the Hessian from forward differences of the gradient (one
    evaluation per polished entry, not p(p+3)/2 + 1), then up to POLISH_MAX_NEWTON_STEPS Newton steps with it."""
    x, fx = _snap_to_lower_bounds(lambda y: fg(y)[0], x, fx, lower)
    h = POLISH_STEP * np.maximum(np.abs(x), 1.0)
    moving = np.flatnonzero((x - lower > 2 * h) & (upper - x > 2 * h))
    if moving.size == 0:
        return x, fx
    fx, gx = fg(x)
    hess = np.empty((moving.size, moving.size))
    for a, i in enumerate(moving):
        y = x.copy()
        y[i] += h[i]
        hess[:, a] = (fg(y)[1][moving] - gx[moving]) / h[i]
    hess = (hess + hess.T) / 2
    if not np.all(np.isfinite(hess)):
        return x, fx
    return _newton_steps(x, fx, gx[moving], hess, moving, h[moving], lower, upper, fg, lambda y, fy, gy: gy[moving])


# L-BFGS-B stops where every entry of the projected gradient is below this (deviance units per unit of theta in
# working coordinates, where the deviance's curvature is O(1) to O(n)): the polish then lands on the stationary
# point; without the polish (refits, profiles) it leaves theta ~1e-5 off at most, BOBYQA's own precision.
LBFGS_GTOL = 1e-5
LBFGS_GTOL_NO_POLISH = 1e-4
# ... or where the deviance changes by less than this, relative: far below any digit reported, and above rounding
# (with 1e-14 Oxboys' fit went on for 30 evaluations at the 13th digit; the polish follows anyway).
LBFGS_FTOL = 1e-12


# L-BFGS-B runs again from the best point it passed at most this many times (see minimize_deviance).
LBFGS_RESTARTS = 4


# ... and where it stopped with a projected gradient above this (the deviance's change per unit of theta), or above
# LBFGS_ROUNDING_SLOPE times the deviance, which is where the gradient's rounding lies (a deviance of 3e6: 2e-3).
LBFGS_RESTART_SLOPE = 1e-3
LBFGS_ROUNDING_SLOPE = 1e-8


def _rounding_slope(deviance: float) -> float:
    return max(LBFGS_RESTART_SLOPE, LBFGS_ROUNDING_SLOPE * abs(deviance))


# A line-search point this close to the last one (relative to each entry: theta's scale follows the weights',
# 1e-3 with weights of 1e6) ends L-BFGS-B: its line search has reached rounding level (Oxboys: ten evaluations
# with steps from 5e-10 down to 2e-15 before it gave up).
LBFGS_MIN_MOVE = 1e-9


class _AtRounding(Exception):
    """L-BFGS-B asked for a point at rounding distance from the last one."""


def _lbfgs(fg, x0, lower, upper, maxeval, polish):
    """scipy's L-BFGS-B with the exact gradient: (converged, message, deviance where it stopped, largest entry of the
    projected gradient there). A line search that fails at rounding level (the projected gradient already small)
    counts as converged; it is stopped at its first point within LBFGS_MIN_MOVE of the last."""
    if maxeval < 1:
        return False, "no evaluations left", np.inf, np.inf
    bounds = [(a if np.isfinite(a) else None, b if np.isfinite(b) else None) for a, b in zip(lower, upper)]
    gtol = LBFGS_GTOL if polish else LBFGS_GTOL_NO_POLISH
    last: list = [None, np.inf, None]  # the last point, its deviance and gradient
    best: list = [None, np.inf, None]

    def tracked(x):
        if last[0] is not None and (np.abs(x - last[0]) <= LBFGS_MIN_MOVE * np.abs(x)).all():
            raise _AtRounding
        value, gradient = fg(x)
        last[:] = np.array(x), value, gradient
        if value <= best[1]:
            best[:] = last
        return value, gradient

    try:
        res = _scipy_minimize(
            tracked,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": maxeval, "maxfun": maxeval, "gtol": gtol, "ftol": LBFGS_FTOL, "maxls": 30},
        )
        x, value, gradient, status, message = res.x, float(res.fun), res.jac, res.status, f"L-BFGS-B: {res.message}"
    except _AtRounding:
        x, value, gradient = best
        status, message = 2, "L-BFGS-B: line search at rounding level"
    projected = np.where((x <= lower) & (gradient > 0) | (x >= upper) & (gradient < 0), 0.0, gradient)
    slope = float(np.max(np.abs(projected), initial=0.0))
    settled = slope <= max(100 * gtol, LBFGS_ROUNDING_SLOPE * abs(value))
    return bool(status == 0 or (status == 2 and settled)), message, value, slope


# Entries this close to their lower bound (theta relative to sigma: an sd below 0.1% of the residual's) are
# tried at the bound itself.
SNAP_DISTANCE = 1e-3


def _snap_to_lower_bounds(f, x, fx, lower):
    """Entries BOBYQA left just above their bound (a zero variance approached but not reached: the deviance is
    flat there, so where it stops depends on the path) are set on the bound where that is not measurably worse."""
    near = np.flatnonzero((x > lower) & (x - lower <= SNAP_DISTANCE))
    for group in ([near] if near.size > 1 else []) + [near[i : i + 1] for i in range(near.size)]:
        if np.all(x[group] == lower[group]):
            continue
        y = x.copy()
        y[group] = lower[group]
        fy = f(y)
        if no_worse(fy, fx):
            x, fx = y, fy
    return x, fx


def no_worse(fy, fx):
    """Whether fy is not measurably worse than fx: near BOBYQA's end point the polish's gains and the snap's
    losses are at rounding level, so they are compared with a relative 1e-12 (numbers, or arrays of them)."""
    return fy <= fx + 1e-12 * np.maximum(1.0, np.abs(fx))


# Stopping rule for BOBYQA: a change of the deviance (-2 log L) below 1e-10, or of every theta entry below
# 1e-8, ends the search; both are far below what a likelihood-ratio or a reported digit can see. When the
# Newton polish follows, lme4's 1e-8 is enough: measured with the polish, InstEval-sized 137 evaluations
# instead of 143, the seed's crossed design 47 instead of 49, at the same deviance to 3e-11.
BOBYQA_FTOL_ABS = 1e-10
BOBYQA_FTOL_ABS_BEFORE_POLISH = 1e-8
# ... or a relative change below 1e-12: on a deviance of 8.5e7 (MovieLens-sized) 1e-8 is below its rounding
# (ulp 1.5e-8), and BOBYQA spent 14 of its 29 evaluations (37 s each) at rounding level; the 1,000,000-row
# slopes fit took 65 evaluations instead of 70, the other designs measured +-4, the optimum the same to 2e-9.
BOBYQA_FTOL_REL_BEFORE_POLISH = 1e-12
BOBYQA_XTOL_ABS = 1e-8


def _bobyqa(f, x0, lower, upper, maxeval, step=None, ftol=BOBYQA_FTOL_ABS, ftol_rel=0.0):
    step = 0.75 * np.maximum(np.abs(x0), 1.0) if step is None else np.asarray(step, dtype=float)
    room = np.maximum(x0 - lower, upper - x0)  # BOBYQA needs its first step inside the box
    step = np.where(np.isfinite(room), np.minimum(step, 0.5 * room), step)
    _check_bobyqa_arguments(x0, step)
    opt = nlopt.opt(nlopt.LN_BOBYQA, x0.shape[0])
    opt.set_min_objective(lambda x, grad: f(x))
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_abs(ftol)
    opt.set_ftol_rel(ftol_rel)
    opt.set_xtol_abs(BOBYQA_XTOL_ABS)
    opt.set_maxeval(int(maxeval))
    opt.set_initial_step(step)
    try:
        opt.optimize(x0)
    except nlopt.RoundoffLimited:
        # Progress stopped at rounding level: the best point seen is as good as the arithmetic allows.
        return True, "stopped at rounding level"
    code = opt.last_optimize_result()
    converged = code in (nlopt.FTOL_REACHED, nlopt.XTOL_REACHED, nlopt.SUCCESS, nlopt.STOPVAL_REACHED)
    message = {
        nlopt.FTOL_REACHED: "deviance change below ftol",
        nlopt.XTOL_REACHED: "theta change below xtol_abs",
        nlopt.MAXEVAL_REACHED: f"stopped after maxiter={maxeval} evaluations",
    }.get(code, f"nlopt code {code}")
    return converged, message


def _check_bobyqa_arguments(x0: np.ndarray, step: np.ndarray) -> None:
    """Refuse what nlopt (2.7 to 2.11 at least) cannot take safely. Its BOBYQA rescales by the initial steps'
    ratios to the first (step[j] / step[0]), and a ratio that is 0 or not finite (a NaN or inf start gives a NaN
    step) returns "invalid arguments" through a path that writes past the end of x: in bobyqa.c the check
    jumps to `done:` before `--x`, and `done:` does `++x; nlopt_unscale(n, s, x, x)`, one double beyond the
    buffer. That corrupts the heap; glibc aborts the process later ("double free or corruption", "free():
    invalid next size") at an unrelated free, the next fit or garbage collection. One entry never rescales
    (n = 1), which is why only models with two or more parameters crashed. Users' starts are checked before
    (checks.check_start); this is the last guard for any other route."""
    ratio = step / step[0] if step.size else step
    if not (
        np.all(np.isfinite(x0))
        and np.all(np.isfinite(step))
        and np.all(step > 0)
        and np.all(np.isfinite(ratio))
        and np.all(ratio > 0)
    ):
        from ..errors import InputError

        raise InputError(
            f"the optimizer cannot start from {x0.tolist()} with first steps {step.tolist()}: every "
            "start value must be a finite number, and the steps finite and positive. Pass a finite "
            "start, or leave it out for the default."
        )


def _scipy_options(method: str, maxiter: int, gtol: float) -> dict:
    """scipy's options: at most half of the evaluations (maxiter counts evaluations here, iterations in scipy), so
    that BOBYQA, which always follows, has the other half. Nelder-Mead once spent all of them (49,383 evaluations
    in 10,000 iterations) on sleepstudy's slope at Days + 1e6, and BOBYQA had none left."""
    budget = max(maxiter // 2, 1)
    if method == "L-BFGS-B":
        return {"maxiter": budget, "maxfun": budget, "gtol": gtol, "ftol": 1e-15, "maxls": 50}
    return {"maxiter": budget, "maxfev": budget}


def singular_entries(theta: np.ndarray, on_diagonal: np.ndarray) -> np.ndarray:
    """Indices of diagonal template entries estimated at (numerically) zero."""
    return np.flatnonzero(on_diagonal & (np.abs(theta) < SINGULAR_TOLERANCE))


def _scipy_minimize(*args, **kwargs):
    """scipy.optimize.minimize, imported on first use: scipy.optimize is ~0.13 s of the package's import, and only
    the fits that end in L-BFGS-B (or a scipy method asked for by name) call it."""
    from scipy.optimize import minimize

    return minimize(*args, **kwargs)
