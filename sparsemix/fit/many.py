"""Many responses, one design: every response's theta found at once by batched Newton steps.

`core/batched.py` evaluates the deviance of all responses in whole-array operations, each at its own theta. The
optimizer here moves all of them together: per response, the gradient and Hessian from central differences (all
difference points of all responses in one batched evaluation), a Newton step (on |eigenvalues| where the
Hessian is not positive definite), halved until the deviance falls. A response whose steps reach a bound (a zero
variance), come near one, or do not settle in NEWTON_MAX_ITERATIONS is left to the one-response pipeline, which
checks boundaries (optimize.release_bounds): here only interior optima are accepted, where Newton's method lands
on the stationary point to ~1e-9, as the single fit's polish does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.batched import ManyResponses
from .optimize import POLISH_REPEAT_ABOVE, POLISH_STEP, no_worse

__all__ = ["minimize_many", "ManyMinimum", "fixed_effects_many"]

NEWTON_MAX_ITERATIONS = 40
# a step halved this many times without the deviance falling: that response goes to the one-response pipeline
MAX_HALVINGS = 12
# sufficient decrease: the deviance must fall by this share of what the gradient predicts (Armijo)
ARMIJO = 1e-4
# diagonal entries (standard deviations relative to sigma) below this at the end: near a zero variance, which the
# one-response pipeline decides (it probes the boundary and snaps there, optimize.SNAP_DISTANCE)
NEAR_BOUND = 1e-2
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


def minimize_many(many: ManyResponses, start: np.ndarray, lower: np.ndarray, reml: bool) -> ManyMinimum:
    """Minimise every response's deviance from `start` (working theta, one row per response or one for all)."""
    R = many.R
    x = np.array(np.broadcast_to(start, (R, lower.size)), dtype=float)
    f = many.deviance(x, reml)
    evaluations = 1
    active = np.isfinite(f)
    settled = np.zeros(R, dtype=bool)
    on_diagonal = np.isfinite(lower)
    for _ in range(NEWTON_MAX_ITERATIONS):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa = x[idx], f[idx]
        h = POLISH_STEP * np.maximum(np.abs(xa), 1.0)
        points = _difference_points(xa, h)
        n_points = points.shape[1]
        values = many.deviance(points.reshape(-1, lower.size), reml, np.repeat(idx, n_points)).reshape(idx.size, -1)
        evaluations += n_points
        g, H = _gradient_hessian(fa, values, h)
        ok = np.isfinite(values).all(axis=1) & np.isfinite(H).all(axis=(1, 2))
        H[~ok] = np.eye(lower.size)
        eigenvalues, vectors = np.linalg.eigh(H)
        positive = eigenvalues.min(axis=1) > 0
        floor = EIGEN_FLOOR * np.abs(eigenvalues).max(axis=1, keepdims=True)
        magnitudes = np.maximum(np.abs(eigenvalues), np.maximum(floor, 1e-300))
        step = -np.einsum("rij,rj->ri", vectors, np.einsum("rji,rj->ri", vectors, g) / magnitudes)
        slope = np.einsum("ri,ri->r", g, step)
        # halve each response's step until its deviance falls enough (all responses still halving evaluated at once)
        alpha = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        trial_x = xa.copy()
        trial_f = fa.copy()
        pending = ok.copy()
        for _ in range(MAX_HALVINGS):
            if not pending.any():
                break
            p = np.flatnonzero(pending)
            candidate = np.maximum(xa[p] + alpha[p, None] * step[p], lower)
            value = many.deviance(candidate, reml, idx[p])
            evaluations += 1
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
        moved = np.abs(trial_x - xa)
        small = np.all(moved <= POLISH_REPEAT_ABOVE * np.maximum(np.abs(trial_x), 1.0), axis=1)
        at_bound = np.any(on_diagonal & (trial_x <= NEAR_BOUND), axis=1)
        x[idx], f[idx] = trial_x, trial_f
        done = accepted & small & positive & ~at_bound
        settled[idx[done]] = True
        # stop with those that settled, and give up on those that failed or went to a boundary
        active[idx[done | ~accepted | at_bound]] = False
    near = np.any(on_diagonal & (x <= NEAR_BOUND), axis=1)
    settled &= ~near
    return ManyMinimum(x, f, settled, evaluations)


def fixed_effects_many(many: ManyResponses, working: np.ndarray, reml: bool) -> tuple[np.ndarray, np.ndarray]:
    """(beta relative to each response's least-squares fit: R x p, sigma^2: R) at each response's working theta."""
    parts = many.parts(working)
    p = many.p
    beta = np.zeros((many.R, p))
    if p:
        beta = np.linalg.solve(parts.RX, parts.cbeta[:, :, None])[:, :, 0]
    return beta, parts.r2 / many.dof(reml)
