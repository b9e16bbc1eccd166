"""Sampling covariance of the variance parameters, from the observed information.

The information is taken in lme4's coordinates (theta, sigma), as lmerTest does: the criterion (-2 log L or
-2 log L_R, beta profiled) is a smooth function of them everywhere, also where a covariance is singular. In
the variance-scale parameters phi (each Psi entry and sigma^2) a singular Psi sits on the edge of the
positive semi-definite cone, where no two-sided derivative exists.

On a boundary (a diagonal entry of a template at zero) the information is that of the boundary stratum:
  - a zero diagonal entry whose column below is zero as well is left out: the criterion depends on its
    square only, so its derivatives of odd order vanish and it takes no part in the first-order
    uncertainty (lmerTest keeps it; its zero gradients make that the same);
  - the Hessian is inverted on its positive eigenvalues (a Moore-Penrose inverse, as lmerTest): on a
    boundary some combinations of theta do not change the covariance at all.
At an interior optimum this is the ordinary inverse, and since the Hessian transforms with the Jacobian at
a stationary point, the covariance of phi by the delta method equals the inverse information in phi.

statsmodels instead reports sqrt(scale) times the standard error of Psi / scale: that is neither the delta
method (which would use scale) nor does it account for the uncertainty in scale. docs/statsmodels.md says
where the numbers differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.system import PenalizedSystem
from .optimize import SINGULAR_TOLERANCE

__all__ = [
    "variance_parameters",
    "VarianceInformation",
    "theta_sigma_information",
    "variance_parameter_covariance",
    "central_hessian",
]

# Relative step of the central differences. The deviance carries ~1e-13 relative rounding; with this step
# the rounding error of a second difference stays near 1e-4 of the curvature and truncation near 1e-6.
RELATIVE_STEP = 1e-3
# Eigenvalues of the (scaled) Hessian below this fraction of the largest are flat directions of the
# boundary (or rounding there) and are left out of its inverse.
EIGENVALUE_TOLERANCE = 1e-9


def variance_parameters(system: PenalizedSystem, theta: np.ndarray, sigma2: float) -> np.ndarray:
    """phi: the free entries of each sigma^2 T T' at the template positions, then sigma^2."""
    parts = []
    for (_, template), T in zip(system.relcov.blocks, system.relcov.factors(theta)):
        psi = sigma2 * (T @ T.T)
        parts.append(np.array([psi[i, j] for i, j in template.positions]))
    parts.append(np.array([sigma2]))
    return np.concatenate(parts)


@dataclass(frozen=True)
class VarianceInformation:
    """Covariance of x = (theta[theta_index], sigma) from the observed information.

    `scales` are the natural sizes of the coordinates of x (the steps of numerical derivatives are
    fractions of them): for T[i, j] the relative standard deviation of column i, sqrt((T T')[i, i]); for
    sigma, sigma.
    """

    theta_index: np.ndarray
    scales: np.ndarray
    cov: np.ndarray


def _boundary_even(system: PenalizedSystem, theta: np.ndarray, boundary: set) -> np.ndarray:
    """The `boundary` theta entries (diagonal entries at zero) with nothing below them in their column, each
    entry below judged against its row's size (the covariate's units don't matter)."""
    even = np.zeros(theta.shape[0], bool)
    for (_, template), sl, T in zip(system.relcov.blocks, system.relcov.theta_slices, system.relcov.factors(theta)):
        rows = np.sqrt(np.sum(T**2, axis=1))
        for a, (i, j) in enumerate(template.positions):
            if sl.start + a in boundary:
                even[sl.start + a] = all(abs(T[r, j]) <= SINGULAR_TOLERANCE * rows[r] for r in range(j + 1, template.k))
    return even


def _theta_scales(system: PenalizedSystem, theta: np.ndarray) -> np.ndarray:
    """Row i's size for T[i, j] (so a covariate's units don't matter); a row at zero takes its term's largest."""
    scales = np.ones(theta.shape[0])
    for (_, template), sl, T in zip(system.relcov.blocks, system.relcov.theta_slices, system.relcov.factors(theta)):
        rows = np.sqrt(np.sum(T**2, axis=1))
        fallback = rows.max() if rows.max() > 0 else 1.0
        scales[sl] = [rows[i] if rows[i] > 1e-8 * fallback else fallback for i, _ in template.positions]
    return scales


def theta_sigma_information(
    system: PenalizedSystem, theta: np.ndarray, sigma2: float, reml: bool, free: np.ndarray, boundary=()
) -> VarianceInformation:
    """Covariance of (theta, sigma) over the `free` theta entries, less the `boundary` ones (diagonal entries
    estimated at zero) that the criterion is even in (see the module notes): 2 H^+ with H the numerical
    Hessian of the criterion."""
    theta = np.asarray(theta, dtype=float)
    sigma = float(np.sqrt(sigma2))
    even = _boundary_even(system, theta, set(np.ravel(boundary).tolist()))
    index = np.flatnonzero(np.asarray(free, bool) & ~even)
    scales = np.append(_theta_scales(system, theta)[index], sigma)
    h = RELATIVE_STEP * scales
    k = scales.shape[0]

    def crit(delta):
        th = theta.copy()
        th[index] += delta[:-1]
        return system.deviance_at_sigma2(th, (sigma + delta[-1]) ** 2, reml)

    H = central_hessian(crit, np.zeros(k), h)
    if not np.all(np.isfinite(H)):
        return VarianceInformation(index, scales, np.full((k, k), np.nan))
    # Eigenvalues compared on the scaled Hessian, whose coordinates are all of size one.
    values, vectors = np.linalg.eigh(H * np.outer(scales, scales))
    keep = values > EIGENVALUE_TOLERANCE * max(values.max(), 0.0)
    if not keep.any():
        return VarianceInformation(index, scales, np.full((k, k), np.nan))
    scaled_inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    # criterion = -2 log L, so the information is H / 2 and the covariance is 2 H^+.
    return VarianceInformation(index, scales, 2.0 * scaled_inverse * np.outer(scales, scales))


def central_hessian(f, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The Hessian of f at x by central second differences with steps h (diagonal from x +- 2 h)."""
    x = np.asarray(x, dtype=float)
    k = x.shape[0]
    E = np.diag(h)
    f0 = f(x)
    H = np.empty((k, k))
    for a in range(k):
        H[a, a] = (f(x + 2 * E[a]) - 2 * f0 + f(x - 2 * E[a])) / (4 * h[a] ** 2)
        for b in range(a):
            H[a, b] = H[b, a] = (f(x + E[a] + E[b]) - f(x + E[a] - E[b]) - f(x - E[a] + E[b]) + f(x - E[a] - E[b])) / (
                4 * h[a] * h[b]
            )
    return H


def variance_parameter_covariance(
    system: PenalizedSystem, theta: np.ndarray, sigma2: float, estimable: np.ndarray, information: VarianceInformation
) -> np.ndarray:
    """Covariance of phi by the delta method from the covariance of (theta, sigma).

    Entries that are not `estimable` (a variance on the boundary makes its whole term so, and a parameter
    held fixed) get NaN rows and columns: their sampling distribution is not normal, and the note on the
    result says so.
    """
    theta = np.asarray(theta, dtype=float)
    sigma = float(np.sqrt(sigma2))
    phi = variance_parameters(system, theta, sigma2)
    m = phi.shape[0]
    # J[phi entry, coordinate]: phi = sigma^2 (T T')[i, j], so d phi / d T[a, b] = sigma^2 (E_ab T' + T E_ba)[i, j].
    J = np.zeros((m, information.theta_index.shape[0] + 1))
    position = {int(t): c for c, t in enumerate(information.theta_index)}
    for (_, template), sl, T in zip(system.relcov.blocks, system.relcov.theta_slices, system.relcov.factors(theta)):
        for p, (a, b) in enumerate(template.positions):
            c = position.get(sl.start + p)
            if c is None:
                continue
            dS = np.zeros_like(T)
            dS[a] += T[:, b]
            dS[:, a] += T[:, b]
            J[sl, c] = sigma2 * np.array([dS[i, j] for i, j in template.positions])
    J[:-1, -1] = 2 * phi[:-1] / sigma
    J[-1, -1] = 2 * sigma
    cov = np.full((m, m), np.nan)
    idx = np.flatnonzero(estimable)
    cov[np.ix_(idx, idx)] = J[idx] @ information.cov @ J[idx].T
    return cov
