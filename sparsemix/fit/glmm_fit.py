"""Fitting a generalized linear mixed model: the Laplace objective (core/glmm.py) minimised as lme4's glmer does.

nAGQ = 0: theta only, beta inside PIRLS (MixedModels.jl's fast=true). nAGQ = 1 (the default): from there, theta
and beta together with PIRLS over u only, by Newton steps from finite differences (fit/many.py's minimize_one;
BOBYQA where they do not settle).
The covariance of beta is lme4's default for glmer: the inverse of half the finite-difference Hessian of the
objective in (theta, beta), its beta block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.glmm import LaplaceSystem, PirlsResult
from .many import difference_hessian, minimize_one, standard_errors
from .optimize import OptimizationResult, minimize_deviance

__all__ = ["GlmmFit", "fit_glmm", "covariance_hessian"]

# The deviance change that ends the nAGQ = 0 stage when it only starts the nAGQ = 1 fit.
STAGE0_FTOL = 1e-3
# ... and PIRLS's tolerance there (the mode then within ~its square: the objective ~1e-6 off, far below STAGE0_FTOL)
STAGE0_PIRLS_TOLERANCE = 1e-2
# The finite-difference step of the Hessian for the covariance of beta (lme4's deriv12 uses 1e-4) ...
HESSIAN_STEP = 1e-4
# ... at most this share of each parameter's standard error (from a first Hessian): the difference Hessian's
# off-diagonal entries (forward differences) are off by about this share, relative. With the relative step alone,
# a poorly scaled parameter's step was half its standard error (Contraception's age^2: its SE 0.27% off lme4's;
# with 0.002 of the SE, all seven within 3e-5 of a central-difference Hessian's).
HESSIAN_SE_STEP = 0.002


@dataclass
class GlmmFit:
    """A fitted GLMM in array form: theta, beta, the mode there, the objective (-2 log L by Laplace), the
    covariance of beta, and the optimizer's record."""

    system: LaplaceSystem
    theta: np.ndarray
    beta: np.ndarray
    mode: PirlsResult
    cov_beta: np.ndarray
    optimization: OptimizationResult
    nAGQ: int
    objective: float = np.nan  # the minimised objective: Laplace (nAGQ <= 1) or quadrature's -2 log L
    cov_params: np.ndarray | None = None  # (theta, beta)'s 2 H^{-1}, where the fit computed H (nAGQ >= 1)

    @property
    def deviance(self) -> float:
        return self.objective

    @property
    def llf(self) -> float:
        """-objective / 2; with quadrature (nAGQ > 1), lme4's logLik for it (see quadrature_log_likelihood_shift)."""
        if self.nAGQ > 1:
            return -0.5 * (self.objective + self.system.quadrature_log_likelihood_shift)
        return -0.5 * self.objective

    @property
    def converged(self) -> bool:
        return bool(self.optimization.converged and self.mode.converged)

    @property
    def b(self) -> np.ndarray:
        """The random effects' conditional modes, Lambda u, in Z's column order."""
        relcov = self.system.relcov
        return relcov.apply(relcov.factors(self.theta), self.mode.u)

    def params_covariance(self) -> np.ndarray:
        """2 H^{-1} of (theta, beta), H the objective's difference Hessian: the fit's, or computed once here."""
        if self.cov_params is None:
            x, m = np.concatenate([self.theta, self.beta]), self.theta.shape[0]
            f = lambda y: self.system.objective(y[:m], y[m:], self.nAGQ)  # noqa: E731
            self.cov_params = _inverse_half(covariance_hessian(f, x))
        return self.cov_params

    def conditional_covariance(self, columns: np.ndarray) -> np.ndarray:
        """Var(b | y) on `columns` of b (the Laplace approximation at the mode)."""
        return self.system.conditional_covariance(self.theta, self.mode, columns)


def fit_glmm(system: LaplaceSystem, nAGQ: int = 1, maxiter: int = 10_000) -> GlmmFit:
    t0 = time.perf_counter()
    relcov, p = system.relcov, system.p
    lower_theta = relcov.lower_bounds
    beta_now = [system.start_beta()]
    stage0_tolerance = None if nAGQ == 0 else STAGE0_PIRLS_TOLERANCE

    def joint_objective(theta):
        r = system.mode_or_none(theta, beta_now[0], joint=True, tolerance=stage0_tolerance)
        if r is None:
            return np.inf
        beta_now[0] = r.beta
        return r.objective

    # for nAGQ = 1 the nAGQ = 0 fit is only the Newton steps' start: to STAGE0_FTOL (VerbAgg: 24 evaluations
    # instead of 41, and the same Newton steps after)
    stage0 = minimize_deviance(
        joint_objective,
        relcov.start(),
        lower_theta,
        maxiter=maxiter,
        method="bobyqa",
        polish=nAGQ == 0,
        ftol=None if nAGQ == 0 else STAGE0_FTOL,
    )
    theta = stage0.theta
    mode = system.pirls(theta, beta_now[0], joint=True)
    beta, opt = mode.beta, stage0
    if nAGQ >= 1:
        start = np.concatenate([theta, beta])
        lower = np.concatenate([lower_theta, np.full(p, -np.inf)])
        m = relcov.n_theta
        objective = lambda x: system.objective(x[:m], x[m:], nAGQ)  # noqa: E731
        # Newton steps from the nAGQ = 0 fit, which lies close; BOBYQA where they do not settle
        probes = lambda x: [(np.r_[a, x[m:]], np.r_[b, x[m:]]) for a, b in relcov.boundary_probes(x[:m])]  # noqa: E731
        exact = None
        if nAGQ == 1 and system.gradient_applies:
            exact = lambda x: system.objective_gradient(x[:m], x[m:])  # noqa: E731
        found = minimize_one(objective, start, lower, probes, se_step=HESSIAN_SE_STEP, value_and_gradient=exact)
        hessian = None
        used = stage0.n_evaluations + found.n_evaluations
        if found.settled[0]:
            x = found.working[0]
            if found.hessian is not None and found.steps is not None:
                hessian = covariance_hessian(objective, x, found.hessian[0], found.steps[0])
            within = used <= maxiter  # maxiter bounds the evaluations of every stage together
            message = "Newton steps" if within else f"Newton steps past maxiter={maxiter} evaluations"
            opt = OptimizationResult(
                x, float(found.deviance[0]), found.n_evaluations, within, message, "newton", 0.0, ()
            )
        else:
            step = np.concatenate([0.1 * np.maximum(np.abs(theta), 0.1), 0.1 * np.maximum(np.abs(beta), 0.1)])
            opt = minimize_deviance(
                objective, start, lower, maxiter=max(maxiter - used, 1), method="bobyqa", initial_step=step, polish=True
            )
        theta, beta = opt.theta[:m], opt.theta[m:]
        mode = system.pirls(theta, beta)
        opt = OptimizationResult(
            opt.theta,
            opt.deviance,
            stage0.n_evaluations + opt.n_evaluations + (0 if found.settled[0] else found.n_evaluations),
            opt.converged,
            opt.message,
            opt.method,
            time.perf_counter() - t0,
            opt.log,
        )
    value = system.objective(theta, beta, nAGQ) if nAGQ >= 1 else mode.objective
    fit = GlmmFit(system, theta, beta, mode, np.empty((0, 0)), opt, nAGQ, value)
    if nAGQ == 0:
        fit.cov_beta = system.fixed_covariance(theta, beta)
    else:
        if hessian is not None and np.all(np.isfinite(hessian)):
            # the last Newton step's difference Hessian (1e-5 of theta and beta away at most), where its steps were
            # covariance_hessian's
            fit.cov_params = _inverse_half(hessian)
        fit.cov_beta = fit.params_covariance()[relcov.n_theta :, relcov.n_theta :]
    system.pirls(theta, beta, joint=nAGQ == 0)  # leave the system at the fit's mode
    return fit


def _inverse_half(H: np.ndarray) -> np.ndarray:
    """2 H^{-1} (NaN where H is singular)."""
    try:
        return 2.0 * np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return np.full(H.shape, np.nan)


def covariance_hessian(f, x: np.ndarray, hessian: np.ndarray | None = None, steps: np.ndarray | None = None):
    """The Hessian of f at x by finite differences for the covariance: steps HESSIAN_STEP relative, at most
    HESSIAN_SE_STEP of each standard error that a first Hessian gives (`hessian`, taken with `steps`, where one
    is at hand: reused where its steps were already that fine)."""
    default = HESSIAN_STEP * np.maximum(np.abs(x), 1.0)
    if hessian is None or steps is None:
        hessian, steps = difference_hessian(f, x, default), default
    wanted = np.minimum(default, HESSIAN_SE_STEP * standard_errors(hessian[None])[0])
    if np.all(steps <= 2.0 * wanted):
        return hessian
    return difference_hessian(f, x, wanted)
