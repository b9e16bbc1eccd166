"""`LmerResults`: lme4's view of a fitted model (VarCorr, ranef, confint, anova), over one `LmmFit`."""

from __future__ import annotations

import weakref
from dataclasses import replace
from functools import cached_property

import numpy as np
import pandas as pd
from scipy import special

from .. import checks
from ..core.coordinates import system_columns
from ..core.system import PenalizedSystem
from ..core.threads import fit_threads
from ..errors import InputError
from ..fit.lmm_fit import LmmFit
from ..fit.optimize import warm_step
from ..fit.pipeline import fit_system, optimized_system
from ..fit.stages import build_fit, optimize_system
from ..formula import newdata as newdata_path
from ..formula.design_rules import theta_names
from ..formula.pickling import PicklableResults
from ..inference.bootstrap import parametric_bootstrap, simulate_responses
from ..inference.profile import ProfileResult, profile_fit
from ..inference.satterthwaite import satterthwaite_df
from ..inference.sdcor import sdcor_of
from .design import LmerDesign

__all__ = ["LmerResults", "ModelAccessors", "response_vector", "linear_predictor", "variance_rows"]


def variance_rows(term_info, covariances, residual) -> pd.DataFrame:
    """lme4's as.data.frame(VarCorr(m)) from each term's covariance: grp, var1, var2, vcov, sdcor; `residual`:
    (variance, sd) for the Residual row, or None (a GLMM's scale is 1)."""
    rows = []
    for info, psi in zip(term_info, covariances):
        sd = np.sqrt(np.diag(psi))
        k = len(info.columns)
        rows += [(info.grp, info.columns[i], None, psi[i, i], sd[i]) for i in range(k)]
        for j in range(k):
            for i in range(j + 1, k):
                cor = psi[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else np.nan
                rows.append((info.grp, info.columns[j], info.columns[i], psi[i, j], cor))
    if residual is not None:
        rows.append(("Residual", None, None, residual[0], residual[1]))
    frame = pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
    for col in ("grp", "var1", "var2"):  # None (not NaN) marks a name that does not apply, as lme4's NA
        frame[col] = pd.Series([v for v in frame[col]], dtype=object).where(frame[col].notna(), None)
    return frame


def linear_predictor(results, newdata, include_random, allow_new_levels, offset) -> pd.Series:
    """X beta + offset (+ Z b with `include_random`) on the fitted rows (newdata None) or on newdata: lmer's
    predict, and glmer's on the link scale. New levels of a grouping factor get the population-level prediction
    when allowed (with a NewLevelWarning saying how many rows); rows of newdata with a missing value in a column
    the model uses predict NaN; levels match by value (sparsemix/formula/newdata.py)."""
    include_random = checks.check_bool(include_random, "include_random")
    allow_new_levels = checks.check_bool(allow_new_levels, "allow_new_levels")
    d = results.design
    beta, b = results.fit_result.beta, results.b
    if newdata is None:
        pred = d.X @ beta + d.offset
        if include_random:
            pred = pred + results._Z @ b
        return pd.Series(pred, index=d.row_index)
    frame = newdata_path.require_frame(newdata)
    off = newdata_path.offset_values(frame, offset)
    needs = newdata_path.lmer_columns(d, include_random)
    frame = newdata_path.model_frame(frame, needs)
    keep = newdata_path.complete_rows(frame, [c for _, cols in needs for c in cols])
    if off is not None:
        keep &= ~np.isnan(off)
    matchers = results.__dict__.setdefault("_level_matchers", {})

    def compute(rows):
        pred = newdata_path.fixed_matrix(rows, d.fixed_info, d.fixed_columns) @ beta
        if d.offset_columns:  # the formula's offset() terms, read from newdata
            pred = pred + newdata_path.fixed_matrix(rows, d.fixed_info, d.offset_columns).sum(axis=1)
        if include_random:
            pred = pred + newdata_path.lmer_random_matrix(d, rows, allow_new_levels, matchers) @ b
        return pred if off is None else pred + off[keep]

    return newdata_path.predict_rows(frame, keep, compute)


def _bare(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.attrs = {}
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


class ModelAccessors:
    """What lme4's fits share (lmer's and glmer's results): AIC, BIC from llf and npar, the fixed effects by name,
    the number of levels of each grouping factor."""

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * self.npar

    @property
    def bic(self) -> float:
        return -2 * self.llf + np.log(self.nobs) * self.npar

    @property
    def fe_params(self) -> pd.Series:
        return pd.Series(self.fit_result.beta, index=list(self.design.fe_names))

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.fit_result.cov_beta)), index=list(self.design.fe_names))

    @cached_property
    def theta_names(self) -> list[str]:
        """lme4's names of theta: factor.column, factor.column_i.column_j (by factor, as getME(m, "theta"))."""
        return theta_names(self.design.term_info, self.design.terms)

    def _wald_intervals(self, level: float) -> pd.DataFrame:
        """lme4's confint(method = "Wald"): the fixed effects +- z SE, NaN for the sd/cor parameters."""
        z = special.ndtri(0.5 + level / 2)
        nan = np.full(len(self.sdcor_names), np.nan)
        beta, se = self.fit_result.beta, self.bse_fe.to_numpy()
        return pd.DataFrame(
            {"lower": np.r_[nan, beta - z * se], "upper": np.r_[nan, beta + z * se]},
            index=self.sdcor_names + list(self.design.fe_names),
        )

    @staticmethod
    def _percentile_intervals(draws: pd.DataFrame, level: float) -> pd.DataFrame:
        """Bootstrap percentile intervals, one row per column of `draws`."""
        q = [(1 - level) / 2, (1 + level) / 2]
        bounds = np.nanquantile(draws.to_numpy(), q, axis=0).T
        return pd.DataFrame(bounds, index=draws.columns, columns=["lower", "upper"])

    residual_names: tuple[str, ...] = ("sigma",)  # the scale's name after the random effects' (none for a GLMM)

    @property
    def sdcor_names(self) -> list[str]:
        """lme4's parameter names with oldNames=FALSE: sd_(Intercept)|Subject, cor_Days.(Intercept)|Subject, sigma
        (named by the grouping factor, so both halves of (x || g) say |g)."""
        out = []
        for info, term in zip(self.design.term_info, self.design.terms):
            g = info.spec.group_name
            for i, j in term.template.positions:
                c = info.columns
                out.append(f"sd_{c[i]}|{g}" if i == j else f"cor_{c[i]}.{c[j]}|{g}")
        return out + list(self.residual_names)

    @property
    def ngroups(self) -> dict:
        """Levels of each grouping factor (lme4's ngrps), by factor name."""
        out = {}
        for info, term in zip(self.design.term_info, self.design.terms):
            out.setdefault(info.spec.group_name, term.n_levels)
        return out

    @property
    def b(self) -> np.ndarray:
        """The random effects' conditional modes in Z's column order (lmer's; glmer's at the mode)."""
        return self.fit_result.b

    def ranef(self, condvar: bool = True) -> dict:
        """Conditional modes per grouping factor: {factor: DataFrame levels x columns}. With condvar, each frame's
        attrs["condsd"] is a DataFrame of conditional standard deviations and attrs["condvar"] the conditional
        covariance per level (levels x k x k), or, as lme4's postVar, a list of such arrays, one per term, when
        several terms share the factor (the two halves of (x || g))."""
        condvar = checks.check_bool(condvar, "condvar")
        out = {}
        b = self.fit_result.b
        offset = 0
        for info, term in zip(self.design.term_info, self.design.terms):
            width = term.n_levels * term.k
            values = b[offset : offset + width].reshape(term.n_levels, term.k)
            frame = pd.DataFrame(values, index=list(term.level_labels), columns=list(info.columns))
            if condvar:
                cv = self._level_blocks(offset, term.n_levels, term.k)
                frame.attrs["condvar"] = cv
                frame.attrs["condsd"] = pd.DataFrame(
                    np.sqrt(np.einsum("lii->li", cv)), index=frame.index, columns=frame.columns
                )
            name = info.spec.group_name
            if name in out:  # lme4 merges terms of the same factor, e.g. the two halves of (x || g)
                prev = out[name]
                merged = pd.concat([_bare(prev), _bare(frame)], axis=1)
                if condvar:
                    merged.attrs["condsd"] = pd.concat([prev.attrs["condsd"], frame.attrs["condsd"]], axis=1)
                    merged.attrs["condvar"] = _as_list(prev.attrs["condvar"]) + [frame.attrs["condvar"]]
                frame = merged
            out[name] = frame
            offset += width
        return out

    def _level_blocks(self, offset: int, n_levels: int, k: int, chunk: int = 512) -> np.ndarray:
        """Var(b | y) of each level's k columns (levels x k x k), solving for `chunk` levels at a time."""
        out = np.empty((n_levels, k, k))
        for start in range(0, n_levels, chunk):
            stop = min(start + chunk, n_levels)
            cov = self.fit_result.conditional_covariance(offset + np.arange(start * k, stop * k))
            m = stop - start
            blocks = cov.reshape(m, k, m, k)
            out[start:stop] = blocks[np.arange(m), :, np.arange(m), :]
        return out

    def ranef_frame(self) -> pd.DataFrame:
        """Long form, as lme4's as.data.frame(ranef(m, condVar=TRUE)): grpvar, term, grp, condval, condsd."""
        rows = []
        for grpvar, frame in self.ranef(condvar=True).items():
            sd = frame.attrs["condsd"]
            for term in frame.columns:
                for level in frame.index:
                    rows.append((grpvar, term, level, frame.loc[level, term], sd.loc[level, term]))
        return pd.DataFrame(rows, columns=["grpvar", "term", "grp", "condval", "condsd"])


class LmerResults(ModelAccessors, PicklableResults):
    """A model fitted by `sparsemix.lmer`: estimates, lme4's accessors (variance components, conditional
    modes, predictions, simulation), lmerTest's Satterthwaite t-tests, profile and bootstrap intervals, and
    the summary table. Picklable."""

    def __init__(self, design: LmerDesign, fit: LmmFit):
        self.design = design
        self.fit_result = fit
        self.reml = fit.reml
        self.method = "REML" if fit.reml else "ML"
        self.nobs = design.nobs
        self.converged = fit.converged
        self.n_evaluations = fit.optimization.n_evaluations
        self.fit_seconds = fit.optimization.seconds

    # -- estimates -----------------------------------------------------------------------------------

    @property
    def llf(self) -> float:
        return float(self.fit_result.llf)

    @property
    def deviance(self) -> float:
        """The optimized criterion: -2 log-likelihood (ML), or the REML criterion (lme4's REMLcrit)."""
        return float(self.fit_result.deviance)

    @property
    def npar(self) -> int:
        return len(self.design.fe_names) + self.fit_result.system.relcov.n_theta + 1

    @property
    def cov_fe(self) -> pd.DataFrame:
        names = list(self.design.fe_names)
        return pd.DataFrame(self.fit_result.cov_beta, index=names, columns=names)

    @property
    def scale(self) -> float:
        return float(self.fit_result.sigma2)

    @property
    def sigma(self) -> float:
        return float(np.sqrt(self.fit_result.sigma2))

    @property
    def theta(self) -> np.ndarray:
        """lme4's theta: each term's relative Cholesky factor, lower triangle column by column, terms ordered
        by decreasing number of levels."""
        return self.fit_result.theta.copy()

    @property
    def fit_log(self):
        """The optimizer's improvements: evaluation, deviance and elapsed seconds (a DataFrame)."""
        return self.fit_result.fit_log

    @property
    def is_singular(self) -> bool:
        return self.fit_result.is_singular

    # -- tables ---------------------------------------------------------------------------------------

    def fixed_effects(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """estimate, std_error, df, t, p per fixed effect; df by Satterthwaite (lmerTest), or ddf="asymptotic"
        for normal p-values (df = inf)."""
        est = self.fit_result.beta
        se = np.sqrt(np.diag(self.fit_result.cov_beta))
        if ddf == "satterthwaite":
            with self.fit_result.system.threads():
                df = satterthwaite_df(self.fit_result, np.eye(est.size))
        elif ddf == "asymptotic":
            df = np.full(est.size, np.inf)
        else:
            raise InputError(f"ddf={ddf!r}: use 'satterthwaite' or 'asymptotic'.")
        t = est / se
        return pd.DataFrame(
            {"estimate": est, "std_error": se, "df": df, "t": t, "p": 2 * special.stdtr(df, -np.abs(t))},
            index=list(self.design.fe_names),
        )

    def variance_components(self) -> pd.DataFrame:
        """lme4's as.data.frame(VarCorr(m)): grp, var1, var2, vcov, sdcor."""
        return variance_rows(self.design.term_info, self.fit_result.covariances(), (self.scale, self.sigma))

    # -- predictions ------------------------------------------------------------------------------------

    @cached_property
    def _Z(self):
        from ..core.cross_products import assemble_Z

        return assemble_Z(list(self.design.terms))

    @property
    def fitted(self) -> pd.Series:
        d = self.design
        return pd.Series(d.X @ self.fit_result.beta + self._Z @ self.fit_result.b + d.offset, index=d.row_index)

    @property
    def resid(self) -> pd.Series:
        return pd.Series(self.design.y, index=self.design.row_index) - self.fitted

    def predict(
        self,
        newdata: pd.DataFrame | None = None,
        include_random: bool = True,
        allow_new_levels: bool = True,
        offset=None,
    ) -> pd.Series:
        """Predictions; new levels of a grouping factor get the population-level prediction when allowed (with a
        NewLevelWarning saying how many rows). Rows of newdata with a missing value in a column the model uses
        predict NaN. Levels match by value (308, 308.0 and "308" are one level): see sparsemix/formula/newdata.py."""
        return linear_predictor(self, newdata, include_random, allow_new_levels, offset)

    def simulate(self, nsim: int = 1, seed=None) -> pd.DataFrame:
        """Responses simulated from the fitted model (new random effects and noise), one column per simulation."""
        nsim, seed = checks.check_count(nsim, "nsim"), checks.check_seed(seed)
        d = self.design
        rng = np.random.default_rng(seed)
        sims = simulate_responses(
            d.X,
            self._Z,
            self.fit_result.system.relcov,
            self.fit_result.theta,
            self.fit_result.beta,
            self.sigma,
            d.weights,
            rng,
            int(nsim),
        )
        sims = sims + d.offset[:, None]
        return pd.DataFrame(sims, index=d.row_index, columns=[f"sim_{i + 1}" for i in range(int(nsim))])

    def _scaled_residual_quantiles(self) -> np.ndarray:
        """Min, quartiles and max of the residuals over sigma (times sqrt(weights)), as summary() prints."""
        resid = self.resid.to_numpy() / self.sigma
        if self.design.weights is not None:
            resid = resid * np.sqrt(self.design.weights)
        return np.quantile(resid, [0, 0.25, 0.5, 0.75, 1])

    # -- refits and inference -------------------------------------------------------------------------

    def refit_ml(self) -> "LmerResults":
        """The same model fitted by maximum likelihood (reuses the cross-products and the factorization)."""
        if not self.reml:
            return self
        system, theta = self.fit_result.system, self.fit_result.theta
        method = self.fit_result.optimization.method
        optimized = optimized_system(system, None, method)  # (x || g) as one term where that helps, as in the fit
        opt = optimize_system(optimized, reml=False, start_theta=theta, method=method, initial_step=warm_step(theta))
        return LmerResults(self.design, build_fit(system, opt, False, optimized=optimized))

    def refit(self, y) -> "LmerResults":
        """The same model fitted to another response `y` (lme4's `refit(object, newresp)`): one value per fitted
        row, in the order of `fitted`, on the response's scale (the offset, if any, is taken off as in the fit).
        Reuses the design, the cross-products' fixed part and the factorization, and starts from this fit's
        theta; the result is the fit `lmer` gives on data holding `y`, to the optimizer's precision."""
        return _refit_response(self, y)

    def profile(self, which=None, level: float = 0.95) -> ProfileResult:
        """lme4's profile(): the ML deviance profiled over each parameter (a REML fit is refitted by ML)."""
        level = checks.check_level(level)
        ml = self.refit_ml()
        with ml.fit_result.system.threads():
            return profile_fit(ml.fit_result, self.sdcor_names, list(self.design.fe_names), level=level, which=which)

    def confint(
        self, method: str = "profile", level: float = 0.95, nsim: int = 500, seed=None, n_jobs=None, which=None
    ) -> pd.DataFrame:
        """Intervals for the sd/cor parameters, sigma and the fixed effects, as lme4's confint():
        "wald" (fixed effects only; NaN for the others), "profile", or "boot" (parametric bootstrap,
        percentile intervals, refits spread over all cores)."""
        level = checks.check_level(level)
        names = self.sdcor_names + list(self.design.fe_names)
        if method == "wald":
            out = self._wald_intervals(level)
        elif method == "profile":
            out = self.profile(which=which, level=level).intervals
        elif method == "boot":
            out = self._percentile_intervals(self.bootstrap(nsim=nsim, seed=seed, n_jobs=n_jobs), level)
        else:
            raise InputError(f"method={method!r}: use 'wald', 'profile' or 'boot'.")
        return out if which is None else out.loc[[n for n in names if n in set(which)]]

    def bootstrap(self, nsim: int = 500, seed=None, n_jobs=None) -> pd.DataFrame:
        """Estimates of (sd, cor, sigma, fixed effects) from `nsim` parametric bootstrap refits."""
        nsim, seed = checks.check_count(nsim, "nsim"), checks.check_seed(seed, generators=False)
        n_jobs = None if n_jobs is None else checks.check_count(n_jobs, "n_jobs (None for all cores)")
        d = self.design
        draws = parametric_bootstrap(self.fit_result, d.X, d.terms, d.weights, nsim=nsim, seed=seed, n_jobs=n_jobs)
        return pd.DataFrame(draws, columns=self.sdcor_names + list(d.fe_names))

    @property
    def sdcor(self) -> pd.Series:
        return pd.Series(
            sdcor_of(self.fit_result.system.relcov, self.fit_result.theta, self.sigma), index=self.sdcor_names
        )

    # -- report ---------------------------------------------------------------------------------------------

    def summary(self):
        from .summary import LmerSummary

        return LmerSummary(self)

    def __repr__(self):
        return f"<sparsemix LmerResults: {self.design.formula}, {self.method}, llf={self.llf:.4f}>"


# results -> [system columns, the system that holds the analysed factor now]: each refit takes the factor over
# from the previous one (weakly keyed: nothing is added to the results or their pickle)
_REFITTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def response_vector(y, n: int, name: str = "y") -> np.ndarray:
    """A new response for the fitted rows: numeric, finite, n values, not constant (InputErrors say which)."""
    if isinstance(y, (pd.Series, pd.DataFrame)):
        y = y.to_numpy()
    if isinstance(y, (str, bytes)) or np.ndim(y) == 0:
        raise InputError(f"{name} must be a vector of {n} numbers, one per fitted row; got {type(y).__name__}.")
    arr = np.asarray(y)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == object):
        raise InputError(f"{name} must hold numbers; got values of type {arr.dtype}.")
    arr = checks.as_numeric_vector(arr, name)
    if arr.shape[0] != n:
        raise InputError(
            f"{name} has {arr.shape[0]} values but the model was fitted to {n} rows; give one value per fitted row "
            "(in the order of results.fitted)."
        )
    checks.check_finite(arr, name, missing_hint=False)
    checks.check_response_varies(arr, name)
    return arr


def _refit_response(results, y):
    """`results`' model fitted to the response `y` (the fitted rows' length): a new LmerResults."""
    design = results.design
    if not isinstance(design, LmerDesign):
        raise InputError("refit(y) needs the model's rows in memory; fit the data as a pandas DataFrame to refit it.")
    y = response_vector(y, design.nobs)
    fit = results.fit_result
    with fit_threads():
        state = _REFITTERS.get(results)
        if state is None:
            state = [system_columns(list(design.terms), fit.system.relcov.column_transforms), fit.system]
            _REFITTERS[results] = state
        columns, donor = state
        donor_system: PenalizedSystem = donor
        cross = fit.system.cross.with_response(design.X, columns, y - design.offset, design.weights)
        system = donor_system.with_response(cross)
        theta = fit.theta
        method = fit.optimization.method
        new = fit_system(
            system,
            reml=fit.reml,
            start_theta=theta,
            method=method,
            pilot=lambda: (theta, warm_step(theta)),  # from the fitted theta, with a first step that close
            singular_names=results.theta_names,
        )
        state[1] = system
    return LmerResults(replace(design, y=y), new)
