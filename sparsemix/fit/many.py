"""Many responses, one design: every response's theta found at once by batched Newton steps.

`core/batched.py` evaluates the deviance of all responses in whole-array operations, each at its own theta. The
optimizer here moves all of them together: per response, the gradient and Hessian from central differences (all
difference points of all responses in one batched evaluation), a Newton step (on |eigenvalues| where the
Hessian is not positive definite), halved until the deviance falls. Zero variances are handled as the
one-response pipeline handles them: steps stop short of a bound, an entry within optimize.SNAP_DISTANCE of it
goes onto it where that is no worse (and is held there), and the end point must pass optimize.release_bounds'
checks. A response that
fails them, or does not settle in NEWTON_MAX_ITERATIONS, is left to the one-response pipeline. Newton's method
lands on the stationary point to ~1e-9, as the single fit's polish does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg as la

from ..core.batched import ManyResponses
from ..core.system import DENSE_MAX_Q, PenalizedSystem
from ..core.terms import CovarianceTemplate
from .optimize import (
    DEFAULT_OPTIMIZER,
    GRADIENT_METHOD,
    POLISH_REPEAT_ABOVE,
    POLISH_STEP,
    RELEASE_MAX_ROUNDS,
    RELEASE_MIN_GAIN,
    RELEASE_MIN_SLOPE,
    RELEASE_NEAR,
    SNAP_DISTANCE,
    no_worse,
    secant_update,
)
from .pilot import components_starts, moment_starts

__all__ = [
    "difference_hessian",
    "minimize_one",
    "minimize_many",
    "ManyMinimum",
    "fixed_effects_many",
    "fit_responses",
    "ResponsesFit",
    "batched_applies",
    "batched_system",
]

NEWTON_MAX_ITERATIONS = 40
# a response with a zero variance held that has not settled after this many more iterations stops for the release
# check (Exam's 3 x 3 term: 39 of 300 responses ran all 40 iterations on the wrong sign of a column)
HELD_MAX_ITERATIONS = 6
# a step halved this many times without the deviance falling: that response goes to the one-response pipeline
MAX_HALVINGS = 12
# sufficient decrease: the deviance must fall by this share of what the gradient predicts (Armijo)
ARMIJO = 1e-4
# the release check's difference step along a probe's direction (units of theta): its slopes are compared with
# RELEASE_MIN_SLOPE (1e-4), far above this step's rounding error (~1e-16 |f| / 1e-6)
SLOPE_STEP = 1e-6
# the start's diagonal entries at least this far inside their bound (a relative sd of 10% of the residual's)
START_INSIDE = 0.1
# a step goes at most this share of the way to a bound (fraction to the boundary, as interior-point methods do)
BOUNDARY_FRACTION = 0.9
# eigenvalues of the difference Hessian floored at this share of the largest one (a saddle or a flat direction)
EIGEN_FLOOR = 1e-8
# From this many parameters on, a Newton step after one that moved them is taken with the last difference Hessian,
# BFGS-updated, and a new gradient (2m evaluations, where the Hessian costs m(m + 3)/2); the step that settles is
# a full one, so the last Hessian is the end point's. Below it the extra steps cost more than the Hessians saved
# (docs/performance-scale.md, twenty-fifth session).
CHORD_MIN_PARAMETERS = 10
# ... at most this many in a row
CHORD_MAX_STEPS = 4


# Several terms (no exact Hessians for the batched steps): batched up to this many parameters. A difference Hessian
# takes m(m + 3)/2 + 1 points a Newton step: with crossed subjects' and items' 2 x 2 terms (6) lmer_many took 10 ms a
# fit where lmer in a loop took 7.7 (many_models.py, thirty-second session); Pixel's 4 are 4x faster batched.
BATCHED_MAX_DIFFERENCE_THETA = 4


@dataclass
class ManyMinimum:
    """Per response: working theta (R x n_theta), deviance, whether the batched steps settled at an interior
    minimum (False: fit that response alone), and the deviance evaluations spent per response."""

    working: np.ndarray
    deviance: np.ndarray
    settled: np.ndarray
    n_evaluations: int
    hessian: np.ndarray | None = None  # each response's last difference Hessian (R x n x n), as computed
    steps: np.ndarray | None = None  # ... and its difference steps (R x n)


def _difference_points(x: np.ndarray, h: np.ndarray, gradient_only: bool = False) -> np.ndarray:
    """For each row of x (R x m): x + h_i e_i, x - h_i e_i (i < m), then x + h_i e_i + h_j e_j (j < i), stacked as
    (R, 2m + m(m-1)/2, m); `gradient_only`: the first 2m."""
    R, m = x.shape
    pairs = [] if gradient_only else [(i, j) for i in range(m) for j in range(i)]
    out = np.repeat(x[:, None, :], 2 * m + len(pairs), axis=1)
    rows = np.arange(m)
    out[:, rows, rows] += h
    out[:, m + rows, rows] -= h
    for a, (i, j) in enumerate(pairs):
        out[:, 2 * m + a, i] += h[:, i]
        out[:, 2 * m + a, j] += h[:, j]
    return out


def _gradient_hessian(f0, values, h):
    """Central-difference gradient, Hessian (central on the diagonal, forward off it) from the values at
    _difference_points."""
    R, m = h.shape
    plus, minus = values[:, :m], values[:, m : 2 * m]
    g = (plus - minus) / (2 * h)
    H = np.zeros((R, m, m))
    rows = np.arange(m)
    H[:, rows, rows] = (plus - 2 * f0[:, None] + minus) / h**2
    a = 2 * m
    for i in range(m):
        for j in range(i):
            H[:, i, j] = H[:, j, i] = (values[:, a] - plus[:, i] - plus[:, j] + f0) / (h[:, i] * h[:, j])
            a += 1
    return g, H


def standard_errors(H: np.ndarray) -> np.ndarray:
    """sqrt(diag(2 H^{-1})) of each Hessian of a deviance (-2 log L) in the stack H (R, m, m); inf where H is not
    finite and positive definite (no bound on a step)."""
    out = np.full(H.shape[:2], np.inf)
    for r in range(H.shape[0]):
        if np.all(np.isfinite(H[r])):
            try:
                out[r] = np.sqrt(2.0 * np.diag(la.cho_solve(la.cho_factor(H[r]), np.eye(H.shape[1]))))
            except la.LinAlgError:
                pass
    return out


def difference_hessian(f, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The Hessian of one function f at x by minimize_many's differences (steps h: central on the diagonal,
    forward off it)."""
    points = _difference_points(x[None], h[None])[0]
    values = np.array([f(point) for point in points])[None]
    return _gradient_hessian(np.array([f(x)]), values, h[None])[1][0]


def minimize_many(
    many: "ManyResponses | _OneFunction",
    start: np.ndarray,
    lower: np.ndarray,
    reml: bool,
    boundary_probes=None,
    se_step: float | None = None,
    near_singular=None,
    chord: bool = False,
    gradient=None,
    exact=None,
) -> ManyMinimum:
    """Minimise every response's deviance from `start` (working theta, one row per response or one for all).

    Steps stop short of a bound; a diagonal entry within optimize.SNAP_DISTANCE of it goes onto it where that is no
    worse (as the one-response polish snaps) and is held there (a zero variance); the other entries go on.
    `boundary_probes` (relcov.boundary_probes): each end point is then checked as optimize.release_bounds checks
    one (no probe lower, no descent a hundredth of the way to one), and a response that fails goes on from there,
    up to RELEASE_MAX_ROUNDS times; one still failing is left unsettled, for the one-response pipeline.
    `se_step`: after the first Hessian, each difference step at most this share of the entry's standard error (from
    the last Hessian, 2 H^{-1}): the last Hessian then gives standard errors to its truncation error, se_step
    relative (see glmm_fit.HESSIAN_SE_STEP), however the parameters are scaled. `near_singular` (R x m points ->
    bools; relcov.near_singular): which end points can have probes at all, the others' release check skipped.
    `chord`: steps between two Hessians with the last one (_newton). `gradient` (one response: points -> values,
    gradients, NaN where there is none): each Hessian from central differences of exact gradients, 2m evaluations
    where the deviance's differences take m(m + 3)/2. `exact` (points, responses -> deviances, gradients, Hessians;
    ManyResponses.hessians): each step from the exact derivatives at its start, and the line search's points
    evaluated with theirs (an accepted step's end is the next step's start)."""
    R, m = many.R, lower.size
    on_diagonal = np.isfinite(lower)
    # a zero variance in the start (a singular first fit) would hold every response there (the deviance is even in
    # that entry: its slope is zero); from a little inside, each goes back to the bound only if its own optimum is
    start = np.where(on_diagonal, np.maximum(start, lower + START_INSIDE), start)
    x = np.array(np.broadcast_to(start, (R, m)), dtype=float)
    f = many.deviance(x, reml)
    evaluations = [1]

    def deviance(points, rows):
        evaluations[0] += 1
        return many.deviance(points, reml, rows)

    if exact is not None:
        derivatives = exact

        def exact(points, rows):
            evaluations[0] += 1
            return derivatives(points, rows)

    active = np.isfinite(f)
    settled = np.zeros(R, dtype=bool)
    held = np.zeros((R, m), dtype=bool)  # entries held at their bound
    hessians = np.full((R, m, m), np.nan)
    steps = np.full((R, m), np.nan)
    for round_ in range(RELEASE_MAX_ROUNDS + 1):
        rows = np.flatnonzero(active)
        last = (hessians, steps)
        _newton(deviance, x, f, active, settled, held, lower, on_diagonal, last, se_step, chord, gradient, exact)
        if boundary_probes is None:
            break
        # the settled, and those stuck with a zero variance held (its column's sign may be the wrong one to go on)
        rows = rows[settled[rows] | (held[rows].any(axis=1) & np.isfinite(f[rows]))]
        if near_singular is not None and rows.size:
            rows = rows[near_singular(x[rows])]
        leave = _release_points(deviance, x, f, rows, boundary_probes)
        if not leave:
            break
        for j, point in leave.items():
            settled[j] = False
            if round_ < RELEASE_MAX_ROUNDS:
                x[j], held[j], active[j] = point, False, True
                f[j] = deviance(point[None], np.array([j]))[0]
    return ManyMinimum(x, f, settled, evaluations[0], hessians, steps)


def _newton(
    deviance,
    x,
    f,
    active,
    settled,
    held,
    lower,
    on_diagonal,
    last,
    se_step=None,
    chord=False,
    gradient=None,
    exact=None,
) -> None:
    """Newton steps on the `active` responses until each settles or fails (x, f, active, settled, held and `last`,
    their last difference Hessians and its steps, updated in place); `se_step` as minimize_many's; `chord`: steps
    after one that moved the parameters reuse its Hessian where there are CHORD_MIN_PARAMETERS of them or more, or
    exact gradients (a secant step then costs one evaluation), one response (every row takes the same kind of
    step); `gradient` and `exact` as minimize_many's."""
    m = lower.size
    hessians, steps = last
    held_for = np.zeros(x.shape[0], dtype=int)  # iterations with an entry held, per response
    chord = chord and (m >= CHORD_MIN_PARAMETERS or gradient is not None)
    chords = 0  # chord steps in a row (0: the next step computes its Hessian)
    model = np.eye(m)  # the chord steps' Hessian (the last difference Hessian, BFGS-updated since)
    previous = (x[0], np.zeros(m))  # the last step's start and gradient there (set before any chord step)
    if exact is not None:  # each response's last exact evaluation: where, its gradient and Hessian
        seen = (np.full(x.shape, np.nan), np.full(x.shape, np.nan), np.full(x.shape + (m,), np.nan))

        def deviance(points, rows):
            values, seen_g, seen_H = exact(points, rows)
            seen[0][rows], seen[1][rows], seen[2][rows] = points, seen_g, seen_H
            return values

    for _ in range(NEWTON_MAX_ITERATIONS):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa, hold = x[idx], f[idx], held[idx]
        h = POLISH_STEP * np.maximum(np.abs(xa), 1.0)
        if se_step is not None:
            h = np.minimum(h, se_step * standard_errors(hessians[idx]))
        reuse = chords > 0
        if reuse:  # the gradient at the new point, the Hessian of the last full step (and its difference steps)
            h = steps[idx]
        if exact is not None:
            fresh = ~np.all(seen[0][idx] == xa, axis=1)
            if fresh.any():
                deviance(xa[fresh], idx[fresh])
            values, g, H = fa[:, None], seen[1][idx], seen[2][idx]
        elif gradient is not None:
            values, g, H = _gradient_differences(gradient, xa, h, reuse)
        else:
            points = _difference_points(xa, h, gradient_only=reuse)
            values = deviance(points.reshape(-1, m), np.repeat(idx, points.shape[1])).reshape(idx.size, -1)
            if reuse:
                g = (values[:, :m] - values[:, m:]) / (2 * h)
            else:
                g, H = _gradient_hessian(fa, values, h)
        if reuse:
            # the last Hessian mapped to the gradient's change over the step since (BFGS), one row (chord: R = 1)
            model = secant_update(model, xa[0] - previous[0], g[0] - previous[1])
            H = model[None].copy()
        else:
            hessians[idx], steps[idx] = H, h
            model = H[0].copy()
        ok = np.isfinite(values).all(axis=1) & np.isfinite(g).all(axis=1) & np.isfinite(H).all(axis=(1, 2))
        H[~ok] = np.eye(m)
        # held entries: no gradient, identity curvature (so they do not move)
        g[hold] = 0.0
        H[hold[:, :, None] | hold[:, None, :]] = 0.0
        H[:, np.arange(m), np.arange(m)] += hold
        eigenvalues, vectors = np.linalg.eigh(H)
        positive = eigenvalues.min(axis=1) > 0
        floor = EIGEN_FLOOR * np.abs(eigenvalues).max(axis=1, keepdims=True)
        magnitudes = np.maximum(np.abs(eigenvalues), np.maximum(floor, 1e-300))
        step = -np.einsum("rij,rj->ri", vectors, np.einsum("rji,rj->ri", vectors, g) / magnitudes)
        step[hold] = 0.0  # (not -1e-20 from the eigenvectors' rounding: the room below would be 0, and the step too)
        # at most BOUNDARY_FRACTION of the way to a bound: a long first step can cross one that the optimum is far
        # from, and on a zero variance the deviance's slope is zero (even in that entry): nothing would bring it back
        room = np.where(on_diagonal & (step < 0), (xa - lower) / np.maximum(-step, 1e-300), np.inf)
        step *= np.minimum(1.0, BOUNDARY_FRACTION * room.min(axis=1))[:, None]
        slope = np.einsum("ri,ri->r", g, step)
        trial_x, trial_f, accepted = _line_search(deviance, idx, xa, fa, step, slope, lower, ok)
        moved = np.abs(trial_x - xa)
        small = np.all(moved <= POLISH_REPEAT_ABOVE * np.maximum(np.abs(trial_x), 1.0), axis=1)
        x[idx], f[idx] = trial_x, trial_f
        done = accepted & small & positive & (not reuse)  # (settled by a step with its own Hessian)
        moving = bool(np.all(accepted & ~small & positive & ~hold.any(axis=1)))
        chords = chords + 1 if chord and moving and chords < CHORD_MAX_STEPS else 0
        previous = (xa[0], g[0])
        # entries just above their bound go onto it where that is no worse (and stay there): then go on from there
        snapped = _snap(deviance, idx[accepted], x, f, held, lower, on_diagonal)
        done[np.isin(idx, snapped)] = False
        settled[idx[done]] = True
        # held and not settling: the zero variance's column may have the wrong sign (the release check decides)
        held_for[idx] += held[idx].any(axis=1)
        failed = ~accepted & (not reuse)  # (a chord step that found no descent is taken again with a new Hessian)
        active[idx[done | failed | (held_for[idx] > HELD_MAX_ITERATIONS)]] = False
    active[:] = False


def _gradient_differences(gradient, xa, h, gradient_only):
    """One response's (values, g, H) from exact gradients: at xa, and unless `gradient_only` at xa +- h_i e_i, the
    Hessian their central differences, symmetrized (values: every point's, for the finiteness check)."""
    m = xa.shape[1]
    points = xa if gradient_only else np.concatenate([xa, _difference_points(xa, h, gradient_only=True)[0]])
    values, grads = gradient(points)
    g = grads[:1].copy()
    if gradient_only:
        return values[None], g, np.full((1, m, m), np.nan)
    H = (grads[1 : m + 1] - grads[m + 1 :]) / (2.0 * h[0][:, None])
    return values[None], g, ((H + H.T) / 2.0)[None]


def _line_search(deviance, idx, xa, fa, step, slope, lower, ok):
    """Each response's step halved until its deviance falls enough (all responses still halving evaluated at once):
    (points, deviances, whether a step was taken)."""
    alpha = np.ones(idx.size)
    accepted = np.zeros(idx.size, dtype=bool)
    trial_x, trial_f = xa.copy(), fa.copy()
    pending = ok.copy()
    for _ in range(MAX_HALVINGS):
        if not pending.any():
            break
        p = np.flatnonzero(pending)
        candidate = np.maximum(xa[p] + alpha[p, None] * step[p], lower)
        value = deviance(candidate, idx[p])
        # a step already at the stationary point cannot lower the deviance beyond rounding: no worse is enough
        tiny = np.all(np.abs(candidate - xa[p]) <= POLISH_REPEAT_ABOVE * np.maximum(np.abs(candidate), 1.0), axis=1)
        good = np.isfinite(value) & (
            (value <= fa[p] + ARMIJO * alpha[p] * np.minimum(slope[p], 0.0)) | (tiny & no_worse(value, fa[p]))
        )
        q = p[good]
        trial_x[q], trial_f[q] = candidate[good], value[good]
        accepted[q] = True
        pending[q] = False
        alpha[p[~good]] /= 2
    return trial_x, trial_f, accepted


def _snap(deviance, rows, x, f, held, lower, on_diagonal) -> np.ndarray:
    """Responses among `rows` whose diagonal entries within SNAP_DISTANCE of their bound (all of them at once)
    are no worse on it: moved there (x, f, held updated in place); returned."""
    near = on_diagonal & (x[rows] > lower) & (x[rows] - lower <= SNAP_DISTANCE)
    rows, near = rows[near.any(axis=1)], near[near.any(axis=1)]
    if rows.size == 0:
        return rows
    candidate = np.where(near, lower, x[rows])
    value = deviance(candidate, rows)
    better = np.isfinite(value) & no_worse(value, f[rows])
    x[rows[better]], f[rows[better]] = candidate[better], value[better]
    held[rows[better]] |= near[better]
    return rows[better]


def _release_points(deviance, x, f, rows, boundary_probes) -> dict:
    """For the responses `rows` whose end point optimize.release_bounds would leave, where it would go on from: the
    lowest probe into the interior lower by RELEASE_MIN_GAIN, or else the first point RELEASE_NEAR of the way to
    a probe where the slope along it is below -RELEASE_MIN_SLOPE (here by central differences)."""
    owners, starts, probes = [], [], []
    for j in rows:
        for start, probe in boundary_probes(x[j]):
            owners.append(j)
            starts.append(start)
            probes.append(probe)
    if not probes:
        return {}
    owners_a, starts_a, probes_a = np.array(owners), np.array(starts), np.array(probes)
    gain = RELEASE_MIN_GAIN * np.maximum(1.0, np.abs(f[owners_a]))
    at_probe = deviance(probes_a, owners_a)
    lower_probe = at_probe < f[owners_a] - gain
    direction = probes_a - starts_a
    length = np.linalg.norm(direction, axis=1, keepdims=True)
    unit = np.divide(direction, length, out=np.zeros_like(direction), where=length > 0)
    near = starts_a + RELEASE_NEAR * direction
    both = np.concatenate([near + SLOPE_STEP * unit, near - SLOPE_STEP * unit])
    values = deviance(both, np.concatenate([owners_a, owners_a]))
    slope = (values[: len(owners)] - values[len(owners) :]) / (2 * SLOPE_STEP)
    falling = (length[:, 0] > 0) & (slope < -RELEASE_MIN_SLOPE)
    out: dict = {}
    for a in np.argsort(np.where(lower_probe, at_probe, np.inf), kind="stable"):
        if lower_probe[a] and owners_a[a] not in out:
            out[owners_a[a]] = probes_a[a]
    for a in np.flatnonzero(falling):
        if owners_a[a] not in out:
            out[owners_a[a]] = near[a]
    return out


def fixed_effects_many(many: ManyResponses, working: np.ndarray, reml: bool) -> tuple[np.ndarray, np.ndarray]:
    """(beta relative to each response's least-squares fit: R x p, sigma^2: R) at each response's working theta."""
    parts = many.parts(working)
    p = many.p
    beta = np.zeros((many.R, p))
    if p:
        beta = np.linalg.solve(parts.RX, parts.cbeta[:, :, None])[:, :, 0]
    return beta, parts.r2 / many.dof(reml)


def batched_applies(system: PenalizedSystem, method: str = DEFAULT_OPTIMIZER) -> bool:
    """Whether fit_responses serves this system: its batched_system held dense (small), with the default optimizer
    (a user's choice of another one is kept: those responses go through the one-response pipeline). A lone term
    held dense with more than DENSE_MAX_Q columns is refitted response by response: a pass's arrays grow with its
    levels times ROWS_PER_PASS responses. Nor lme4's `(x || g)` beside other terms, held dense with its first term
    eliminated: the fit optimizes its merged term (pipeline.optimized_system), which the one-response pipeline
    refits in a fraction of the batched steps' time on the split terms (docs/performance-scale.md, sixteenth
    session); alone, the batched steps optimize it merged too. Nor several terms of more than
    BATCHED_MAX_DIFFERENCE_THETA parameters: their Hessians from differences cost more than the one-response
    pipeline's exact ones."""
    if method not in (DEFAULT_OPTIMIZER, GRADIENT_METHOD):
        return False
    target = batched_system(system)
    return (
        target.factorization_mode == "dense"
        and target.relcov.q <= DENSE_MAX_Q
        and (system.one_grouping or system.relcov.n_theta <= BATCHED_MAX_DIFFERENCE_THETA)
        and not (system.diagonal_runs and system.first_eliminated_beside_others and not system.one_grouping)
    )


@dataclass
class ResponsesFit:
    """fit_responses' results, per response (R): whether the batched steps settled it (the others are for the
    one-response pipeline), its reported theta where they stopped (None where the deviance was never finite),
    deviance, fixed effects (beta_ols added back) and sigma^2; seconds per response."""

    settled: np.ndarray
    theta: list
    deviance: np.ndarray
    beta: np.ndarray
    sigma2: np.ndarray
    seconds: float


def batched_system(system: PenalizedSystem) -> PenalizedSystem:
    """The system fit_responses' steps optimize (and batched_applies judges): lme4's `(x || g)` alone as its merged
    term, as pipeline.optimized_system takes it for one response (held dense where its split terms are not:
    MathAchieve's `(SES || School)`), else `system`."""
    return system.merged_system() if system.diagonal_runs and system.one_grouping else system


def fit_responses(system: PenalizedSystem, sums, start_theta: np.ndarray, reml: bool) -> ResponsesFit:
    """Every response's optimum at once from `start_theta` (reported): `sums` = (Z'y, X'y, y'y, beta_ols) of the
    responses as CrossProducts.response_sums gives them, for `system`'s design. lme4's `(x || g)` alone is
    optimized as one term (its merged_system, as pipeline.optimized_system does for one response): the exact
    Hessians of one term's levels."""
    t0 = time.perf_counter()
    Zty, Xty, yty, beta_ols = sums
    optimized = batched_system(system)
    merged_Zty = Zty if optimized is system else Zty[system.merged_order]
    relcov = optimized.relcov
    many = ManyResponses(optimized.cross, relcov, merged_Zty, Xty, yty)
    found = minimize_many(
        many,
        _starts(system, many, Zty, relcov.working_theta(start_theta), reml),
        relcov.lower_bounds,
        reml,
        relcov.boundary_probes,
        near_singular=relcov.near_singular,
        exact=(lambda points, rows: many.hessians(points, reml, rows)) if many.has_hessians else None,
    )
    beta, sigma2 = fixed_effects_many(many, found.working, reml)
    reported = relcov.reported_thetas(found.working)
    theta = [t if np.isfinite(f) else None for t, f in zip(reported, found.deviance)]
    seconds = (time.perf_counter() - t0) / max(many.R, 1)
    return ResponsesFit(found.settled, theta, found.deviance, beta + beta_ols.T, sigma2, seconds)


def _starts(system: PenalizedSystem, many: ManyResponses, Zty, common: np.ndarray, reml: bool) -> np.ndarray:
    """Each response's start (R x n_theta, working), the moments a fit of it alone would start from: one term with
    slopes (lme4's `(x || g)` merged into one), its levels' own fits' (pilot.moment_starts); variance components
    (every term of `system` scalar; Zty in its columns' order), their level means' (pilot.components_starts); on a
    balanced design each is its optimum. `common` (the first response's optimum) where neither applies, or for a
    response whose moments are not a covariance."""
    template = many.relcov.blocks[0][1]
    found = None
    if not many.q2 and many.q1 and template.k > 1:
        if template in (CovarianceTemplate.unstructured(template.k), CovarianceTemplate.diagonal(template.k)):
            found = moment_starts(
                many.G11, many.first_fixed_cross, many.Zty, many.yty, many.n, reml, template.is_diagonal
            )
        if found is not None:
            rows, cols = np.array(template.positions).T
            found = (found[0][:, rows, cols], found[1])
    else:  # (None unless every term is scalar)
        found = components_starts(system, Zty, many.yty, reml)
    if found is None:
        return common
    working, ok = found
    return np.where(ok[:, None], working, common)


class _OneFunction:
    """One objective f(x) in ManyResponses' place (R = 1): minimize_one's Newton steps are minimize_many's."""

    R = 1

    def __init__(self, f):
        self.f = f
        self.count = 0

    def deviance(self, points, reml=None, rows=None):
        points = np.atleast_2d(points)
        self.count += points.shape[0]
        return np.array([self.f(point) for point in points])

    def gradients(self, points, value_and_gradient):
        """(values, gradients) of value_and_gradient(x) -> (value, gradient or None) at each point (NaN: none)."""
        self.count += points.shape[0]
        values, grads = np.empty(points.shape[0]), np.full(points.shape, np.nan)
        for i, point in enumerate(points):
            values[i], g = value_and_gradient(point)
            if g is not None:
                grads[i] = g
        return values, grads


def minimize_one(
    f, start: np.ndarray, lower: np.ndarray, boundary_probes=None, se_step=None, value_and_gradient=None
) -> ManyMinimum:
    """minimize_many's Newton steps (central differences, zero variances held at their bound, the release check)
    on one smooth objective f(x) of a few parameters, from a start near its minimum (glmer's (theta, beta) from
    the nAGQ = 0 fit: 181 evaluations where BOBYQA and its polish took 264). `value_and_gradient` (x -> f(x) and
    its exact gradient, or None where it has none): each Hessian from the gradients' central differences."""
    one = _OneFunction(f)
    gradient = None
    if value_and_gradient is not None:
        gradient = lambda points: one.gradients(points, value_and_gradient)  # noqa: E731
    found = minimize_many(
        one, np.asarray(start, dtype=float), lower, True, boundary_probes, se_step, chord=True, gradient=gradient
    )
    found.n_evaluations = one.count
    return found
