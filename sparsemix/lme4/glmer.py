"""`sparsemix.glmer(formula, data, family)`: generalized linear mixed models in lme4's formula language, by the
Laplace approximation over the sparse engine (core/glmm.py, fit/glmm_fit.py). The design is lmer's
(design.py); the results (GlmerResults) mirror LmerResults' estimates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import patsy
from scipy import special

from .. import checks
from ..core.cross_products import assemble_Z
from ..core.families import Binomial, NegativeBinomial, Poisson, family_of
from ..core.glmm import LaplaceSystem
from ..core.relcov import RelativeCovariance
from ..core.threads import fit_threads
from ..errors import ConvergenceWarning, FormulaError, InputError
from ..fit.glmm_fit import GlmmFit, fit_glmm
from ..fit.optimize import singular_entries
from ..formula.mixedlm import expression_values
from ..formula.pickling import PicklableResults
from ..formula.safety import check_formula, formula_environment
from ..inference.bootstrap import glmm_bootstrap
from ..inference.profile import glmm_profile_intervals
from ..inference.sdcor import sdcor_of
from .design import LmerDesign, build_design
from .results import ModelAccessors, linear_predictor, variance_rows

__all__ = ["glmer", "glmer_nb", "GlmerResults"]

MAX_NAGQ = 100  # lme4's limit on Gauss-Hermite nodes


def glmer(
    formula: str,
    data: pd.DataFrame,
    family="binomial",
    weights=None,
    offset=None,
    nAGQ: int = 1,
    maxiter: int = 10_000,
    eval_env=None,
) -> "GlmerResults":
    """Fit a generalized linear mixed model written in lme4's formula language (lme4's glmer).

    family: "binomial" or "poisson", or a family object (sparsemix.families.Binomial(link="probit")). A binomial
    response is 0/1 (numbers or booleans), a factor (text or categorical: its first level failure, as R reads it),
    a proportion with `weights` the trials, or cbind(successes, failures).
    weights: prior weights; for the binomial, the numbers of trials, the response then the proportion of
    successes (lme4's `weights` with a proportion). offset: a column name or an array added to the linear
    predictor. nAGQ: 1 (the Laplace approximation, the default), 0 (beta inside PIRLS, theta alone optimized),
    or more: adaptive Gauss-Hermite quadrature with that many nodes, for one scalar random-effect term (as
    lme4; its logLik then integrates the deviance residuals, and so does `llf`).
    """
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
    fam = family_of(family)
    if not isinstance(nAGQ, (int, np.integer)) or isinstance(nAGQ, bool) or not 0 <= nAGQ <= MAX_NAGQ:
        raise InputError(
            f"nAGQ={nAGQ!r}: give 0 (theta only optimized, beta inside PIRLS), 1 (the Laplace approximation, the "
            f"default) or up to {MAX_NAGQ} Gauss-Hermite nodes (one scalar random-effect term only)."
        )
    maxiter = checks.check_count(maxiter, "maxiter")
    env = formula_environment(eval_env)
    written = formula
    formula, data, weights = _cbind_response(formula, data, weights, fam, env)
    data = _factor_response(formula, data, fam)
    with fit_threads():
        design = build_design(formula, data, weights=weights, offset=offset, eval_env=env, linear=False)
        design = replace(design, formula=written)
        fit = _fit_design(design, fam, int(nAGQ), maxiter)
    _warn_about(design, fit, fam)
    return GlmerResults(design, fit, fam)


def _fit_design(design: LmerDesign, family, nAGQ: int, maxiter: int) -> GlmmFit:
    """The GLMM of `design` with `family`, by fit_glmm."""
    terms = list(design.terms)
    relcov = RelativeCovariance([(t.n_levels, t.template) for t in terms])
    system = LaplaceSystem(
        design.X, design.y, assemble_Z(terms), relcov, family, prior_weights=design.weights, offset=design.offset
    )
    if nAGQ > 1 and not system.quadrature_applies:
        raise InputError(
            f"nAGQ={nAGQ}: adaptive Gauss-Hermite quadrature needs a single scalar random-effect term such as "
            f"(1 | g) (as lme4); this model has {len(terms)} term(s) with "
            f"{[t.k for t in terms]} column(s). Use nAGQ=1 (the Laplace approximation)."
        )
    return fit_glmm(system, nAGQ=nAGQ, maxiter=maxiter)


def _warn_about(design, fit: GlmmFit, family) -> None:
    import warnings

    _warn_if_separated(design, fit, family)
    if not fit.converged:
        warnings.warn(
            f"the fit did not converge after {fit.optimization.n_evaluations} evaluations: {fit.optimization.message}",
            ConvergenceWarning,
            stacklevel=3,
        )


def glmer_nb(
    formula: str, data: pd.DataFrame, weights=None, offset=None, nAGQ: int = 1, maxiter: int = 10_000, eval_env=None
) -> "GlmerResults":
    """Negative binomial counts with the dispersion theta estimated (lme4's glmer.nb): a Poisson fit first, theta
    from its means (maximum likelihood), then theta chosen to maximise the GLMM's log-likelihood, each value a
    glmer fit with NegativeBinomial(theta). The results' family holds the estimate; `npar` counts it."""
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
    from scipy import optimize  # (imported on first use: ~0.13 s of the package's import)

    maxiter = checks.check_count(maxiter, "maxiter")
    env = formula_environment(eval_env)
    with fit_threads():
        design = build_design(formula, data, weights=weights, offset=offset, eval_env=env, linear=False)
        poisson = _fit_design(design, Poisson(), int(nAGQ), maxiter)
        prior = np.ones(design.nobs) if design.weights is None else design.weights
        start = _theta_from_means(design.y, poisson.mode.mu, prior)
        fits: dict = {}

        def minus_llf(log_theta):
            key = float(log_theta)
            if key not in fits:
                fits[key] = _fit_design(design, NegativeBinomial(float(np.exp(key))), int(nAGQ), maxiter)
            return -fits[key].llf

        found = optimize.minimize_scalar(
            minus_llf,
            bounds=(np.log(start) - NB_LOG_THETA_RANGE, np.log(start) + NB_LOG_THETA_RANGE),
            method="bounded",
            options={"xatol": NB_LOG_THETA_TOLERANCE},
        )
        best = min(fits, key=lambda k: -fits[k].llf)
        fit, family = fits[best], NegativeBinomial(float(np.exp(best)))
    if not found.success:
        fit.optimization = replace(fit.optimization, converged=False, message=f"theta: {found.message}")
    _warn_about(design, fit, family)
    return GlmerResults(design, fit, family)


# theta is searched within this many e-folds of the value its Poisson fit's means give, to this precision (in
# log theta: 1e-5 relative in theta, far below its standard error)
NB_LOG_THETA_RANGE = 5.0
NB_LOG_THETA_TOLERANCE = 1e-5


def _theta_from_means(y, mu, weights) -> float:
    """The negative binomial's theta by maximum likelihood given the means mu (MASS's theta.ml)."""
    from scipy import optimize  # (imported on first use: ~0.13 s of the package's import)

    def minus_loglik(log_theta):
        family = NegativeBinomial(float(np.exp(log_theta)))
        return -family.loglik(y, mu, weights)

    found = optimize.minimize_scalar(minus_loglik, bounds=(-10.0, 15.0), method="bounded")
    return float(np.exp(found.x))


# A fitted probability this close to 0 or 1, in a row whose response it matches, is perfectly predicted; a fixed
# effect moving the linear predictor by more than SEPARATION_SPREAD over one standard deviation of its column,
# with such rows, is running off to infinity (complete or quasi-complete separation), as R's glm warns.
SEPARATION_PROBABILITY = 1e-8
SEPARATION_SPREAD = 15.0


def _warn_if_separated(design, fit: GlmmFit, family) -> None:
    """The binomial's complete separation: warn naming the fixed effect that runs off, and the rows it decides."""
    if not isinstance(family, Binomial):
        return
    mu, y = fit.mode.mu, design.y
    decided = ((mu < SEPARATION_PROBABILITY) & (y == 0)) | ((mu > 1 - SEPARATION_PROBABILITY) & (y == 1))
    if not decided.any() or design.X.shape[1] == 0:
        return
    spread = np.abs(fit.beta) * design.X.std(axis=0)
    j = int(np.argmax(spread))
    if spread[j] <= SEPARATION_SPREAD:
        return
    import warnings

    warnings.warn(
        f"complete separation: the fixed effect {design.fe_names[j]!r} runs off (estimate {fit.beta[j]:.4g}, "
        f"moving the linear predictor by {spread[j]:.3g} over one standard deviation of its column), and "
        f"{int(decided.sum())} of {len(y)} rows are predicted exactly (fitted probability 0 or 1). Its estimate "
        "and standard error mean nothing; remove that predictor, merge its levels, or use a penalized fit.",
        ConvergenceWarning,
        stacklevel=3,
    )
    fit.optimization = replace(fit.optimization, converged=False, message="complete separation")


def _factor_response(formula: str, data: pd.DataFrame, family) -> pd.DataFrame:
    """A binomial response given as a factor (text or categorical column), as R reads it: the first level (the
    categorical's first, or the first in sorted order) is failure, every other level success."""
    name = formula.split("~", 1)[0].strip()
    if not isinstance(family, Binomial) or name not in data.columns:
        return data
    column = data[name]
    if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
        return data
    levels = (
        list(column.cat.categories)
        if isinstance(column.dtype, pd.CategoricalDtype)
        else sorted(column.dropna().unique(), key=str)
    )
    if len(levels) < 2:
        raise InputError(f"the binomial response {name!r} has {len(levels)} level(s); it needs two or more.")
    failure = levels[0]
    values = np.where(column.isna(), np.nan, (column != failure).to_numpy(dtype=float))
    return data.assign(**{name: values})


def _cbind_response(formula: str, data: pd.DataFrame, weights, family, env):
    """lme4's cbind(successes, failures) response for the binomial: the proportion of successes, with the trials
    (times any prior weights) as weights. (formula, data, weights) unchanged for any other response."""
    response = formula.split("~", 1)[0].strip()
    if not (response.startswith("cbind(") and response.endswith(")")):
        return formula, data, weights
    if not isinstance(family, Binomial):
        raise InputError(f"a cbind(successes, failures) response is for the binomial family; this is {family!r}.")
    inner = response[len("cbind(") : -1]
    depth, comma = 0, None
    for i, ch in enumerate(inner):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if comma is not None:
                comma = -1
                break
            comma = i
    if comma is None or comma < 0:
        raise FormulaError(f"{response!r}: write cbind(successes, failures), two expressions.")
    successes, failures = (_column_values(data, e.strip(), env) for e in (inner[:comma], inner[comma + 1 :]))
    trials = successes + failures
    with np.errstate(invalid="ignore", divide="ignore"):
        proportion = np.where(trials > 0, successes / np.where(trials > 0, trials, 1.0), np.nan)
    if np.any((successes < 0) | (failures < 0)):
        raise InputError(f"{response!r}: numbers of successes and failures cannot be negative.")
    name = "cbind_response"
    while name in data.columns:
        name += "_"
    prior = (
        np.ones(len(data))
        if weights is None
        else np.asarray(data[weights] if isinstance(weights, str) else weights, dtype=float)
    )
    rest = formula.split("~", 1)[1]
    # a row with no trials says nothing: dropped as a missing value would be (R drops it from the likelihood)
    return f"{name} ~{rest}", data.assign(**{name: proportion}), prior * trials


def _column_values(data: pd.DataFrame, expr: str, env) -> np.ndarray:
    """One expression of the data's columns, a number per row (NaN where a value is missing)."""
    formula = f"0 + I({expr})"
    desc = check_formula(formula, data.columns, env, "cbind() response")  # nothing in a formula runs before this
    values = expression_values(expr, desc, data, env)
    if values is not None:
        return values
    matrix = patsy.dmatrix(formula, data, eval_env=env, NA_action=patsy.NAAction(NA_types=[]))
    if matrix.shape[1] != 1:  # text or a factor: patsy's indicators, one column per level
        raise FormulaError(
            f"cbind() response: {expr!r} must be a number per row (counts of successes or failures); it reads as "
            f"{matrix.shape[1]} columns ({', '.join(matrix.design_info.column_names[:3])}, ...): a text or factor "
            "column. Convert it to numbers first."
        )
    return np.asarray(matrix, dtype=float)[:, 0]


class GlmerResults(ModelAccessors, PicklableResults):
    """A model fitted by `sparsemix.glmer`: the estimates, as LmerResults names them."""

    residual_names = ()  # a GLMM has no residual scale to name

    def __init__(self, design: LmerDesign, fit: GlmmFit, family):
        self.design, self.fit_result, self.family = design, fit, family
        self.nobs = design.nobs
        self.nAGQ = fit.nAGQ
        self.converged = fit.converged
        self.n_evaluations = fit.optimization.n_evaluations

    @property
    def llf(self) -> float:
        """lme4's logLik for the approximation used (Laplace for nAGQ = 1)."""
        return float(self.fit_result.llf)

    @property
    def deviance(self) -> float:
        """-2 llf."""
        return -2.0 * self.llf

    @property
    def npar(self) -> int:
        """Fixed effects, theta's entries, and the negative binomial's dispersion where it was estimated."""
        extra = 1 if isinstance(self.family, NegativeBinomial) else 0
        return len(self.design.fe_names) + self.fit_result.system.relcov.n_theta + extra

    def fixed_effects(self) -> pd.DataFrame:
        """Estimate, standard error, z and its two-sided p (lme4's glmer summary)."""
        est, se = self.fe_params, self.bse_fe
        z = est / se
        return pd.DataFrame({"estimate": est, "std_error": se, "z": z, "p": 2 * special.ndtr(-np.abs(z))})

    @property
    def theta(self) -> np.ndarray:
        return self.fit_result.theta

    @property
    def sdcor(self) -> pd.Series:
        """Standard deviations and correlations of the random effects (the scale is 1: no sigma)."""
        values = sdcor_of(self.fit_result.system.relcov, self.theta, 1.0)[:-1]
        return pd.Series(values, index=self.sdcor_names)

    @property
    def is_singular(self) -> bool:
        """lme4's isSingular: a diagonal template entry below its tolerance (as an lmer fit's)."""
        return singular_entries(self.theta, self.fit_result.system.relcov.on_diagonal).size > 0

    @property
    def fitted(self) -> pd.Series:
        """The conditional means mu (the response's scale), by row of the fitted data."""
        return pd.Series(self.fit_result.mode.mu, index=self.design.row_index)

    # -- lme4's accessors ---------------------------------------------------------------------------------

    reml = False  # a GLMM's likelihood has no REML form (anova compares the fits as they are)

    def refit_ml(self) -> "GlmerResults":
        return self

    def covariances(self) -> list[np.ndarray]:
        """Psi_t = T_t T_t' for every term (a GLMM's scale is 1)."""
        return [T @ T.T for T in self.fit_result.system.relcov.factors(self.theta)]

    def variance_components(self) -> pd.DataFrame:
        """lme4's as.data.frame(VarCorr(m)): grp, var1, var2, vcov, sdcor (no residual row: the scale is 1)."""
        return variance_rows(self.design.term_info, self.covariances(), residual=None)

    @property
    def _Z(self):
        return self.fit_result.system.Z

    def predict(
        self,
        newdata: pd.DataFrame | None = None,
        type: str = "link",
        include_random: bool = True,
        allow_new_levels: bool = True,
        offset=None,
    ) -> pd.Series:
        """Predictions on the linear predictor's scale (type="link") or the response's (type="response"); new
        levels of a grouping factor get the population-level prediction when allowed, as LmerResults.predict."""
        if type not in ("link", "response"):
            raise InputError(f"type={type!r}: use 'link' (the linear predictor) or 'response' (the mean).")
        eta = linear_predictor(self, newdata, include_random, allow_new_levels, offset)
        return eta if type == "link" else pd.Series(self.family.linkinv(eta.to_numpy()), index=eta.index)

    def resid(self, type: str = "deviance") -> pd.Series:
        """Residuals (lme4's residuals(type=)): "deviance" (the default), "pearson" or "response"."""
        y, mu = self.design.y, self.fit_result.mode.mu
        w = self.fit_result.system.prior_weights
        if type == "response":
            values = y - mu
        elif type == "pearson":
            values = (y - mu) * np.sqrt(w / self.family.variance(mu))
        elif type == "deviance":
            values = np.sign(y - mu) * np.sqrt(np.maximum(self.family.dev_resid(y, mu, w), 0.0))
        else:
            raise InputError(f"type={type!r}: use 'deviance', 'pearson' or 'response'.")
        return pd.Series(values, index=self.design.row_index)

    def simulate(self, nsim: int = 1, seed=None) -> pd.DataFrame:
        """Responses simulated from the fitted model (new random effects, then the family's draws), one column per
        simulation: for the binomial the proportion of successes out of the prior weights' trials."""
        nsim, seed = checks.check_count(nsim, "nsim"), checks.check_seed(seed)
        rng = np.random.default_rng(seed)
        relcov, d = self.fit_result.system.relcov, self.design
        factors = relcov.factors(self.theta)
        fixed = d.X @ self.fit_result.beta + d.offset
        trials = self.fit_result.system.prior_weights
        out = np.empty((self.nobs, int(nsim)))
        for s in range(int(nsim)):
            mu = self.family.linkinv(fixed + self._Z @ relcov.apply(factors, rng.standard_normal(relcov.q)))
            out[:, s] = self.family.draw(rng, mu, trials)
        return pd.DataFrame(out, index=d.row_index, columns=[f"sim_{i + 1}" for i in range(int(nsim))])

    def bootstrap(self, nsim: int = 500, seed=None, n_jobs=None) -> pd.DataFrame:
        """Estimates (sd/cor, fixed effects) from `nsim` parametric bootstrap refits: responses simulated from the
        fit (simulate), each fitted as glmer fits (the same design, family, weights and offset), spread over
        `n_jobs` worker processes (all cores by default)."""
        nsim, seed = checks.check_count(nsim, "nsim"), checks.check_seed(seed)
        n_jobs = None if n_jobs is None else checks.check_count(n_jobs, "n_jobs (None for all cores)")
        sims = self.simulate(nsim, seed).to_numpy()
        with fit_threads():
            draws = glmm_bootstrap(self.fit_result.system, sims, self.nAGQ, n_jobs)
        return pd.DataFrame(draws, columns=self.sdcor_names + list(self.design.fe_names))

    def confint(
        self, method: str = "wald", level: float = 0.95, nsim: int = 500, seed=None, n_jobs=None
    ) -> pd.DataFrame:
        """Wald intervals for the fixed effects (lme4's method = "Wald"; NaN for the random effects' sd/cor);
        "profile": profile-likelihood intervals for every parameter, the random effects' on the sd/cor scale, as
        lme4's; "boot": percentile intervals from `nsim` parametric
        bootstrap refits."""
        level = checks.check_level(level)
        if method == "profile":
            with fit_threads():
                return glmm_profile_intervals(self.fit_result, self.sdcor_names + list(self.fe_params.index), level)
        if method == "boot":
            return self._percentile_intervals(self.bootstrap(nsim=nsim, seed=seed, n_jobs=n_jobs), level)
        if method != "wald":
            raise InputError(f"method={method!r}: glmer's intervals are 'wald', 'profile' or 'boot'.")
        return self._wald_intervals(level)

    def summary(self):
        from .summary import GlmerSummary

        return GlmerSummary(self)

    def __repr__(self):
        return f"<sparsemix GlmerResults: {self.design.formula}, {self.family!r}, llf={self.llf:.4f}>"
