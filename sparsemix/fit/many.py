"""Many responses, one design: every response's theta found at once by batched Newton steps.

`core/batched.py` evaluates the deviance of all responses in whole-array operations, each at its own theta. The
optimizer here moves all of them together: per response, the gradient and Hessian from central differences (all
difference points of all responses in one batched evaluation), a Newton step (on |eigenvalues| where the
Hessian is not positive definite), halved until the deviance falls. Zero variances are handled as the
one-response pipeline handles them: an entry stepping below its bound is held there, one ending just above it
goes onto it where that is no worse, and the end point must pass optimize.release_bounds' checks. A response that
fails them, or does not settle in NEWTON_MAX_ITERATIONS, is left to the one-response pipeline. Newton's method
lands on the stationary point to ~1e-9, as the single fit's polish does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.batched import ManyResponses
from ..core.system import PenalizedSystem
from .optimize import (
    DEFAULT_OPTIMIZER,
    GRADIENT_METHOD,
    POLISH_REPEAT_ABOVE,
    POLISH_STEP,
    RELEASE_MIN_GAIN,
    RELEASE_MIN_SLOPE,
    RELEASE_NEAR,
    SNAP_DISTANCE,
    no_worse,
)

__all__ = ["minimize_many", "ManyMinimum", "fixed_effects_many", "fit_responses", "ResponsesFit", "batched_applies"]

NEWTON_MAX_ITERATIONS = 40
# a step halved this many times without the deviance falling: that response goes to the one-response pipeline
MAX_HALVINGS = 12
# sufficient decrease: the deviance must fall by this share of what the gradient predicts (Armijo)
ARMIJO = 1e-4
# the release check's difference step along a probe's direction (units of theta): its slopes are compared with
# RELEASE_MIN_SLOPE (1e-4), far above this step's rounding error (~1e-16 |f| / 1e-6)
SLOPE_STEP = 1e-6
# eigenvalues of the difference Hessian floored at this share of the largest one (a saddle or a flat direction)
EIGEN_FLOOR = 1e-8


@dataclass
class ManyMinimum:
    """Per response: working theta (R x n_theta), deviance, whether the batched steps settled at an interior
    minimum (False: fit that response alone), and the deviance evaluations spent per response."""

    working: np.ndarray
    deviance: np.ndarray
    settled: np.ndarray
    n_evaluations: int


def _difference_points(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """For each row of x (R x m): x + h_i e_i, x - h_i e_i (i < m), then x + h_i e_i + h_j e_j (j < i), stacked as
    (R, 2m + m(m-1)/2, m)."""
    R, m = x.shape
    pairs = [(i, j) for i in range(m) for j in range(i)]
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


def minimize_many(
    many: ManyResponses, start: np.ndarray, lower: np.ndarray, reml: bool, boundary_probes=None
) -> ManyMinimum:
    """Minimise every response's deviance from `start` (working theta, one row per response or one for all).

    A diagonal entry a step would take below its bound is held there (a zero variance), and so is one that ends
    within optimize.SNAP_DISTANCE of it where the bound is no worse (as the one-response polish snaps); the
    other entries go on. `boundary_probes` (relcov.boundary_probes): an end point is then checked as
    optimize.release_bounds checks one (no probe lower, no descent a hundredth of the way to one); a response
    that fails the check is left unsettled, for the one-response pipeline to leave that boundary."""
    R, m = many.R, lower.size
    x = np.array(np.broadcast_to(start, (R, m)), dtype=float)
    f = many.deviance(x, reml)
    evaluations = [1]

    def deviance(points, rows):
        evaluations[0] += 1
        return many.deviance(points, reml, rows)

    active = np.isfinite(f)
    settled = np.zeros(R, dtype=bool)
    on_diagonal = np.isfinite(lower)
    held = np.zeros((R, m), dtype=bool)  # entries held at their bound
    for _ in range(NEWTON_MAX_ITERATIONS):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa, hold = x[idx], f[idx], held[idx]
        h = POLISH_STEP * np.maximum(np.abs(xa), 1.0)
        points = _difference_points(xa, h)
        values = deviance(points.reshape(-1, m), np.repeat(idx, points.shape[1])).reshape(idx.size, -1)
        g, H = _gradient_hessian(fa, values, h)
        ok = np.isfinite(values).all(axis=1) & np.isfinite(H).all(axis=(1, 2))
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
        slope = np.einsum("ri,ri->r", g, step)
        trial_x, trial_f, accepted = _line_search(deviance, idx, xa, fa, step, slope, lower, ok)
        moved = np.abs(trial_x - xa)
        small = np.all(moved <= POLISH_REPEAT_ABOVE * np.maximum(np.abs(trial_x), 1.0), axis=1)
        held[idx] |= on_diagonal & (trial_x <= lower) & (step < 0) & accepted[:, None]
        x[idx], f[idx] = trial_x, trial_f
        done = accepted & small & positive
        # at the end, entries just above their bound go onto it where that is no worse: then go on from there
        snapped = _snap(deviance, idx[done], x, f, held, lower, on_diagonal)
        done[np.isin(idx, snapped)] = False
        settled[idx[done]] = True
        active[idx[done | ~accepted]] = False
    if boundary_probes is not None:
        settled &= _no_release(deviance, x, f, settled, boundary_probes)
    return ManyMinimum(x, f, settled, evaluations[0])


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


def _no_release(deviance, x, f, settled, boundary_probes) -> np.ndarray:
    """False for the settled responses whose end point optimize.release_bounds would leave: a probe into the
    interior lower by RELEASE_MIN_GAIN, or a slope below -RELEASE_MIN_SLOPE RELEASE_NEAR of the way to one (here
    by central differences along it)."""
    keep = np.ones(x.shape[0], dtype=bool)
    owners, starts, probes = [], [], []
    for j in np.flatnonzero(settled):
        for start, probe in boundary_probes(x[j]):
            owners.append(j)
            starts.append(start)
            probes.append(probe)
    if not probes:
        return keep
    owners_a, starts_a, probes_a = np.array(owners), np.array(starts), np.array(probes)
    gain = RELEASE_MIN_GAIN * np.maximum(1.0, np.abs(f[owners_a]))
    lower_probe = ~(deviance(probes_a, owners_a) >= f[owners_a] - gain)
    direction = probes_a - starts_a
    length = np.linalg.norm(direction, axis=1, keepdims=True)
    unit = np.divide(direction, length, out=np.zeros_like(direction), where=length > 0)
    near = starts_a + RELEASE_NEAR * direction
    both = np.concatenate([near + SLOPE_STEP * unit, near - SLOPE_STEP * unit])
    values = deviance(both, np.concatenate([owners_a, owners_a]))
    slope = (values[: len(owners)] - values[len(owners) :]) / (2 * SLOPE_STEP)
    falling = (length[:, 0] > 0) & ~(slope >= -RELEASE_MIN_SLOPE)
    keep[owners_a[lower_probe | falling]] = False
    return keep


def fixed_effects_many(many: ManyResponses, working: np.ndarray, reml: bool) -> tuple[np.ndarray, np.ndarray]:
    """(beta relative to each response's least-squares fit: R x p, sigma^2: R) at each response's working theta."""
    parts = many.parts(working)
    p = many.p
    beta = np.zeros((many.R, p))
    if p:
        beta = np.linalg.solve(parts.RX, parts.cbeta[:, :, None])[:, :, 0]
    return beta, parts.r2 / many.dof(reml)


def batched_applies(system: PenalizedSystem, method: str = DEFAULT_OPTIMIZER) -> bool:
    """Whether fit_responses serves this system: held dense (small), with the default optimizer (a user's choice
    of another one is kept: those responses go through the one-response pipeline)."""
    return system.factorization_mode == "dense" and method in (DEFAULT_OPTIMIZER, GRADIENT_METHOD)


@dataclass
class ResponsesFit:
    """fit_responses' results, per response (R): whether the batched steps settled it, its reported theta (where
    they stopped: the start for the one-response pipeline where not settled; None where the deviance was never
    finite), deviance, fixed effects (beta_ols added back) and sigma^2; seconds per response."""

    settled: np.ndarray
    theta: list
    deviance: np.ndarray
    beta: np.ndarray
    sigma2: np.ndarray
    seconds: float


def fit_responses(system: PenalizedSystem, sums, start_theta: np.ndarray, reml: bool) -> ResponsesFit:
    """Every response's optimum at once from `start_theta` (reported): `sums` = (Z'y, X'y, y'y, beta_ols) of the
    responses as CrossProducts.response_sums gives them, for `system`'s design."""
    t0 = time.perf_counter()
    relcov = system.relcov
    Zty, Xty, yty, beta_ols = sums
    many = ManyResponses(system.cross, relcov, Zty, Xty, yty)
    found = minimize_many(many, relcov.working_theta(start_theta), relcov.lower_bounds, reml, relcov.boundary_probes)
    beta, sigma2 = fixed_effects_many(many, found.working, reml)
    theta = [relcov.reported_theta(w) if np.isfinite(f) else None for w, f in zip(found.working, found.deviance)]
    seconds = (time.perf_counter() - t0) / max(many.R, 1)
    return ResponsesFit(found.settled, theta, found.deviance, beta + beta_ols.T, sigma2, seconds)
