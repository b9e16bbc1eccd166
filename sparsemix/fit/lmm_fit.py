"""The fitted model in array form, built once after the optimizer stops.

`LmmFit` knows arrays only (theta, beta, covariances, random effects in Z's column order); the API layers
(compat.statsmodels, and later the lme4-style interface) attach names and frames to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.linalg as la

from ..core.system import PenalizedSystem, Solution
from .information import (
    VarianceInformation,
    theta_sigma_information,
    variance_parameter_covariance,
    variance_parameters,
)
from .optimize import OptimizationResult, singular_entries

__all__ = ["LmmFit"]


@dataclass(frozen=True)
class LmmFit:
    """A fitted linear mixed model in array form, as every door's results read it: the system (the deviance
    function), the solution at the optimum (theta, beta, conditional modes, sigma^2), the optimizer's record,
    the criterion (REML or ML) and which entries of theta were free; the covariances and the singularity check
    are derived on demand."""

    system: PenalizedSystem = field(repr=False)
    solution: Solution = field(repr=False)
    optimization: OptimizationResult
    reml: bool
    free: np.ndarray  # which theta entries the optimizer moved

    # -- the estimates --------------------------------------------------------------------------------

    @property
    def theta(self) -> np.ndarray:
        return self.solution.theta

    @property
    def beta(self) -> np.ndarray:
        return self.solution.beta

    @property
    def sigma2(self) -> float:
        return self.solution.sigma2

    @property
    def b(self) -> np.ndarray:
        """Conditional modes of the random effects, in Z's column order."""
        return self.solution.b

    @property
    def deviance(self) -> float:
        """The optimized criterion: -2 log L (ML) or -2 log L_R (REML)."""
        return self.solution.deviance

    @property
    def llf(self) -> float:
        return -0.5 * self.deviance

    @property
    def nobs(self) -> int:
        return self.system.cross.n

    @property
    def n_fixed(self) -> int:
        return self.system.cross.p

    @property
    def converged(self) -> bool:
        return self.optimization.converged

    @property
    def fit_log(self):
        """The optimizer's improvements: a DataFrame of evaluation, deviance and elapsed seconds."""
        import pandas as pd

        return pd.DataFrame(list(self.optimization.log), columns=["evaluation", "deviance", "seconds"])

    @cached_property
    def singular(self) -> np.ndarray:
        """theta indices of template diagonal entries estimated at zero (lme4's isSingular)."""
        relcov = self.system.relcov  # judged on centred, scaled columns: a covariate's units don't matter
        working = self.optimization.working_theta
        if working is None or not np.array_equal(self.optimization.theta, self.theta):
            working = relcov.working_theta(self.theta)
        return singular_entries(working, relcov.on_diagonal)

    @property
    def is_singular(self) -> bool:
        return self.singular.size > 0

    def template_factors(self) -> list[np.ndarray]:
        return self.system.relcov.factors(self.theta)

    def covariances(self) -> list[np.ndarray]:
        """Psi_t = sigma^2 T_t T_t' for every term, on the variance scale."""
        return [self.sigma2 * (T @ T.T) for T in self.template_factors()]

    # -- sampling covariances ------------------------------------------------------------------------

    @cached_property
    def cov_beta(self) -> np.ndarray:
        """sigma^2 (R_X' R_X)^{-1}: the covariance of beta-hat given theta (lme4's vcov)."""
        RX = self.solution.evaluation.RX
        if RX.size == 0:
            return np.zeros((0, 0))
        RXinv = la.solve_triangular(RX, np.eye(RX.shape[0]), lower=False)
        return self.sigma2 * (RXinv @ RXinv.T)

    @cached_property
    def variance_parameters(self) -> np.ndarray:
        """phi: each term's free Psi entries (template order), then sigma^2."""
        return variance_parameters(self.system, self.theta, self.sigma2)

    @cached_property
    def estimable_variance_parameters(self) -> np.ndarray:
        """Which entries of phi have a normal-theory standard error: free and not on the boundary."""
        relcov = self.system.relcov
        ok = np.append(self.free.copy(), True)
        for (_, template), sl in zip(relcov.blocks, relcov.theta_slices):
            if np.intersect1d(self.singular, np.arange(sl.start, sl.stop)).size:
                ok[sl] = False  # a zero variance makes the whole term's Psi singular
        return ok

    @cached_property
    def variance_information(self) -> VarianceInformation:
        """Covariance of (theta, sigma) from the observed information, over the free theta entries off the
        boundary (lmerTest's coordinates; finite on singular fits too)."""
        with self.system.threads():
            return theta_sigma_information(self.system, self.theta, self.sigma2, self.reml, self.free, self.singular)

    @cached_property
    def cov_variance_parameters(self) -> np.ndarray:
        """Covariance of phi by the delta method from `variance_information` (NaN where not estimable)."""
        return variance_parameter_covariance(
            self.system, self.theta, self.sigma2, self.estimable_variance_parameters, self.variance_information
        )

    def conditional_covariance(self, columns: np.ndarray) -> np.ndarray:
        """Var(b | y) for the given Z columns, at the estimates."""
        return self.sigma2 * self.system.conditional_covariance(self.theta, columns)
