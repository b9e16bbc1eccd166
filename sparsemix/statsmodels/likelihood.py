"""statsmodels' likelihood surface of a MixedLM at given parameters, computed by sparsemix's engine.

statsmodels' conventions: the parameters are relative to the residual variance (cov_re / scale and
vcomp / scale), the scale is always profiled out, and the fixed effects are either profiled (their GLS
estimates) or given. Given fixed effects beta enter through the identity
    (y - X beta)' V^-1 (y - X beta) = r2 + |R_X (beta - beta_hat)|^2,
so one evaluation of the engine at theta serves any beta.

The score and the Hessian are central differences of the log-likelihood (statsmodels derives them
analytically for its dense per-group algebra; sparsemix's own fits need neither).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.linalg as la

from ..core.coordinates import lower_factor
from ..errors import InputError
from ..fit.information import central_hessian as information_hessian

__all__ = ["psd_factor", "loglike_at", "gls_at", "central_gradient", "central_hessian"]

# statsmodels' tolerance for a singular covariance (get_fe_params): eigenvalues below it count as zero.
SINGULAR_EIGENVALUE = 1e-10


def psd_factor(cov: np.ndarray) -> np.ndarray | None:
    """A lower-triangular L with L L' = cov for a positive semi-definite cov (singular ones included, which
    numpy's Cholesky refuses); None if cov has a clearly negative eigenvalue."""
    cov = np.atleast_2d(np.asarray(cov, dtype=float))
    if cov.size == 0:
        return np.zeros((0, 0))
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        pass
    w, V = np.linalg.eigh((cov + cov.T) / 2)
    if w.min() < -1e-10 * max(1.0, abs(w).max()):
        return None
    return lower_factor(V * np.sqrt(np.clip(w, 0.0, None)))  # cov = B B'; B re-triangularized


def theta_of(model, cov_re, vcomp) -> np.ndarray | None:
    """The engine's theta for relative cov_re and vcomp; None where they are not a covariance."""
    parts = []
    if model.k_re:
        T = psd_factor(cov_re)
        if T is None:
            return None
        parts.append(model._re_template(False).theta_of(T))
    vcomp = np.asarray(vcomp, dtype=float).reshape(-1)
    if vcomp.shape[0] != model.k_vc:
        raise InputError(f"vcomp has {vcomp.shape[0]} entries but the model has {model.k_vc} variance components.")
    if np.any(vcomp < 0):
        return None
    parts.append(np.sqrt(vcomp))
    return np.concatenate(parts)


def gls_at(model, theta, reml):
    """(evaluation, beta_hat) at theta, or (None, None) where X'V^-1X is numerically singular."""
    system = model._likelihood_system
    ev = system.evaluate(theta)
    if not ev.feasible:
        return None, None
    beta_work, _ = system.modes(ev)
    return ev, beta_work + system.cross.beta_ols


def quadratic_form(ev, beta_hat, beta) -> float:
    """(y - X beta)' V_rel^-1 (y - X beta), V_rel = V / scale."""
    d = ev.RX @ (np.asarray(beta, dtype=float) - beta_hat)
    return float(ev.r2 + d @ d)


def loglike_at(model, pa, reml: bool, profile_fe: bool) -> float:
    """statsmodels' MixedLM.loglike: scale profiled; fe profiled or pa.fe_params. -inf where the covariance
    is not positive semi-definite or the fixed effects are not estimable."""
    theta = theta_of(model, pa.cov_re, pa.vcomp)
    if theta is None:
        return -np.inf
    ev, beta_hat = gls_at(model, theta, reml)
    if ev is None:
        return -np.inf
    if not profile_fe:
        fe = np.asarray(pa.fe_params, dtype=float).reshape(-1)
        if fe.shape[0] != model.k_fe:
            raise InputError(
                f"params has {fe.shape[0]} fixed effects but the model has {model.k_fe}; pass "
                "profile_fe=True to use the GLS estimates instead."
            )
        ev = replace(ev, r2=quadratic_form(ev, beta_hat, fe))
    return -0.5 * model._likelihood_system.profiled_deviance(ev, reml)


def _steps(x: np.ndarray, power: int) -> np.ndarray:
    # statsmodels.tools.numdiff's choice: EPS^(1/power) * max(|x|, 0.1)
    return np.finfo(float).eps ** (1.0 / power) * np.maximum(np.abs(x), 0.1)


def central_gradient(f, x: np.ndarray) -> np.ndarray:
    """Central differences; one-sided next to a point where f is not finite (a parameter at its bound)."""
    x = np.asarray(x, dtype=float)
    h = _steps(x, 3)
    f0 = f(x)
    g = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        e = np.zeros_like(x)
        e[i] = h[i]
        up, down = f(x + e), f(x - e)
        if np.isfinite(up) and np.isfinite(down):
            g[i] = (up - down) / (2 * h[i])
        elif np.isfinite(up):
            g[i] = (up - f0) / h[i]
        elif np.isfinite(down):
            g[i] = (f0 - down) / h[i]
        else:
            g[i] = np.nan
    return g


def central_hessian(f, x: np.ndarray) -> np.ndarray:
    """Central second differences (information.central_hessian) with statsmodels' steps; NaN in the entries
    whose stencil leaves the domain of f."""
    x = np.asarray(x, dtype=float)
    H = information_hessian(f, x, _steps(x, 4))
    H[~np.isfinite(H)] = np.nan
    return H


def is_singular(cov_re) -> bool:
    """statsmodels' test for a singular random-effects covariance (it then uses a pseudo-inverse)."""
    cov_re = np.atleast_2d(np.asarray(cov_re, dtype=float))
    if cov_re.size == 0:
        return False
    return bool(la.eigvalsh((cov_re + cov_re.T) / 2).min() < SINGULAR_EIGENVALUE)
