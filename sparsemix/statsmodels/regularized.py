"""`MixedLM.fit_regularized`: penalized fixed effects, the dependence parameters held at the unpenalized fit.

statsmodels' semantics. With method="l1", its cyclic coordinate descent ("shooting") on
    (y - X beta)' V^-1 (y - X beta) + sum_j alpha_j |beta_j|,
V = scale (I + Z Lambda Lambda' Z') from the unpenalized fit, started at the unpenalized estimates; a
coefficient whose magnitude is below `ceps` is no longer updated, and the descent stops when no coefficient
moves by `ptol` in a sweep, or after `maxit` sweeps. As V is held, the loss is the quadratic
(beta - beta_hat)' G (beta - beta_hat) + const with G = X'V^-1X = R_X'R_X / scale from the fit, so a sweep
costs O(k_fe^2) and never touches the data. The scale is then re-estimated at the penalized fixed effects
(statsmodels' get_scale); cov_re and vcomp stay those of the unpenalized fit, as statsmodels reports them.

A smooth penalty (an object with `func(beta)` and `deriv(beta)`, such as statsmodels' L2 or PseudoHuber; its
`alpha` is set to the `alpha` given, as statsmodels does) is handled in the same frame: the log-likelihood at
the held V (scale profiled) minus `penalty.func(beta)` is maximized over beta by L-BFGS. statsmodels passes
such a penalty to `fit(fe_pen=...)`, which leaves the fixed effects at their unpenalized GLS values (see
docs/statsmodels.md).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import cached_property

import numpy as np

from ..errors import ConvergenceWarning, InputError
from .likelihood import quadratic_form
from .params import MixedLMParams
from .results import MixedLMResults

__all__ = ["fit_regularized"]


def fit_regularized(
    model, start_params=None, method="l1", alpha=0, ceps=1e-4, ptol=1e-6, maxit=200, **fit_kwargs
) -> "RegularizedResults":
    smooth = not isinstance(method, str)
    if smooth and not (callable(getattr(method, "func", None)) and callable(getattr(method, "deriv", None))):
        raise InputError(
            f"method={method!r} is neither 'l1' nor a penalty object with func(params) and "
            "deriv(params) methods (such as statsmodels.base._penalties.L2())."
        )
    if not smooth and method.lower() != "l1":
        raise InputError(
            f"Invalid regularization method {method!r}: use 'l1', or a smooth penalty object "
            "with func(params) and deriv(params)."
        )
    weights = (
        np.broadcast_to(np.asarray(alpha, dtype=float), (model.k_fe,))
        if np.ndim(alpha) == 0
        else np.asarray(alpha, dtype=float)
    )
    if not smooth and (weights.shape != (model.k_fe,) or np.any(weights < 0) or not np.all(np.isfinite(weights))):
        raise InputError(
            f"alpha must be a non-negative number or a vector of {model.k_fe} non-negative weights "
            f"(one per fixed effect); got shape {np.shape(alpha)}."
        )
    if not (ceps >= 0 and ptol > 0 and int(maxit) >= 1):
        raise InputError(f"need ceps >= 0, ptol > 0 and maxit >= 1; got ceps={ceps}, ptol={ptol}, maxit={maxit}.")

    unpenalized = model.fit(start_params=start_params, **fit_kwargs)
    fit = unpenalized.fit_result
    ev, beta_hat = fit.solution.evaluation, fit.beta
    G_rel = ev.RX.T @ ev.RX  # X' V_rel^-1 X at theta-hat
    if smooth:
        method.alpha = alpha
        beta, converged = _smooth(model, ev, beta_hat, G_rel, method)
        nonzero = np.ones(model.k_fe, dtype=bool)
    else:
        beta, converged = _shooting(G_rel / unpenalized.scale, beta_hat, weights, ceps, ptol, int(maxit))
        nonzero = np.abs(beta) > ceps
        if not converged:
            warnings.warn(
                f"the L1 coordinate descent did not converge in maxit={maxit} sweeps (largest change "
                f"above ptol={ptol}); raise maxit.",
                ConvergenceWarning,
                stacklevel=3,
            )
    return RegularizedResults(unpenalized, beta, nonzero, converged and unpenalized.converged)


def _shooting(G, beta_hat, alpha, ceps, ptol, maxit) -> tuple[np.ndarray, bool]:
    """statsmodels' coordinate descent on (beta - beta_hat)' G (beta - beta_hat) + sum alpha |beta|: for each
    coordinate the loss is a x^2 + b x + alpha_j |x| with a = G_jj, b = -2 (G beta_hat - G_-j beta_-j)_j."""
    beta = beta_hat.copy()
    h = G @ beta_hat  # X'V^-1 y (the GLS normal equations)
    for _ in range(maxit):
        previous = beta.copy()
        for j in range(beta.shape[0]):
            if abs(beta[j]) < ceps:
                continue
            beta[j] = 0.0
            a = G[j, j]
            b = -2.0 * (h[j] - G[j] @ beta)
            if b > alpha[j]:
                beta[j] = -(b - alpha[j]) / (2 * a)
            elif b < -alpha[j]:
                beta[j] = -(b + alpha[j]) / (2 * a)
        if np.abs(previous - beta).max() < ptol:
            return beta, True
    return beta, False


def _smooth(model, ev, beta_hat, G_rel, penalty) -> tuple[np.ndarray, bool]:
    """Maximize loglike(beta) - penalty.func(beta) with theta held and the scale profiled."""
    from scipy import optimize  # (imported on first use: ~0.13 s of the package's import)

    dof = model._likelihood_system.dof(model.reml)

    def objective(beta):
        qf = quadratic_form(ev, beta_hat, beta)
        value = 0.5 * dof * np.log(qf) + penalty.func(beta)
        grad = dof * (G_rel @ (beta - beta_hat)) / qf + np.asarray(penalty.deriv(beta), dtype=float)
        return value, grad

    opt = optimize.minimize(
        objective, beta_hat.copy(), jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15}
    )
    return opt.x, bool(opt.success)


class RegularizedResults(MixedLMResults):
    """Results of fit_regularized: the penalized fixed effects with the unpenalized fit's dependence
    parameters. Standard errors of the fixed effects that are not zero (|beta| > ceps) are those of GLS at
    the held V, restricted to them; the zero ones have none (NaN), as in statsmodels."""

    def __init__(self, unpenalized: MixedLMResults, fe, nonzero, converged):
        super().__init__(unpenalized.model, unpenalized.fit_result, unpenalized.freepat)
        self._unpenalized = unpenalized
        self._fe = np.asarray(fe, dtype=float)
        self._nonzero = np.asarray(nonzero, dtype=bool)
        self.converged = bool(converged)
        fit = self.fit_result
        system = fit.system
        ev = fit.solution.evaluation
        qf = quadratic_form(ev, fit.beta, self._fe)
        self.scale = qf / system.dof(self.reml)  # statsmodels' get_scale at the penalized fe
        self.llf = -0.5 * system.profiled_deviance(replace(ev, r2=qf), self.reml)

    @cached_property
    def params_object(self) -> MixedLMParams:
        base = self._unpenalized.params_object
        return MixedLMParams.from_components(self._fe, base.cov_re, vcomp=base.vcomp)

    @property
    def cov_re_unscaled(self):
        return self._unpenalized.cov_re_unscaled

    @cached_property
    def _cov_params(self) -> np.ndarray:
        cov = self._unpenalized._cov_params.copy()
        k = self.k_fe
        RX = self.fit_result.solution.evaluation.RX
        nz = np.flatnonzero(self._nonzero)
        block = np.full((k, k), np.nan)
        if nz.size:
            block[np.ix_(nz, nz)] = self.scale * np.linalg.inv(RX[:, nz].T @ RX[:, nz])
        cov[:k, :k] = block
        cov[:k, k:] = np.where(self._nonzero[:, None], 0.0, np.nan)
        cov[k:, :k] = cov[:k, k:].T
        return cov

    @cached_property
    def _b(self) -> np.ndarray:
        """Conditional modes of the random effects given the penalized fixed effects (theta held)."""
        fit = self.fit_result
        system = fit.system
        with system.threads():
            ev = system.evaluation_at(fit.theta)
            u = system.half_solve_t(ev.cu - ev.RZX @ (self._fe - system.cross.beta_ols))
        return system.relcov.apply(system.relcov.factors(fit.theta), u)

    def profile_re(self, *args, **kwargs):
        raise InputError("profile_re profiles the unpenalized likelihood; call it on model.fit()'s results.")

    def __repr__(self):
        return f"<sparsemix regularized MixedLMResults: {self.method}, llf={self.llf:.4f}>"
