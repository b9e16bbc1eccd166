"""`MixedLMResults`: statsmodels' results attributes, computed from one `LmmFit`.

Conventions kept from statsmodels: `params`, `bse`, `tvalues`, `pvalues`, `conf_int()` and `cov_params()`
hold [fe_params, lower triangle of cov_re / scale (row-major), vcomp / scale]; `cov_re`, `vcomp` and the
summary's variance rows are on the variance scale.

Where we differ on purpose: the standard errors of the variance parameters come from the observed
information on the variance scale, with the uncertainty of `scale` included (`bse_re`, the summary's
Std.Err. for "Var"/"Cov" rows, and the delta method for `bse` of the unscaled parameters). statsmodels
reports sqrt(scale) x SE(parameter / scale) instead, which understates them by about a factor sqrt(scale).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
from scipy import special

from .. import checks
from ..core.cross_products import assemble_Z
from ..errors import InputError
from ..fit.lmm_fit import LmmFit
from ..fit.stages import build_system, optimize_system
from ..formula import newdata as newdata_path
from ..formula.pickling import PicklableResults
from .params import MixedLMParams
from .summary import MixedLMSummary

__all__ = ["MixedLMResults"]


class MixedLMResults(PicklableResults):
    """A model fitted by `MixedLM.fit`, with statsmodels' MixedLMResults attribute and method names
    (fe_params, cov_re, vcomp, bse, random_effects, summary, ...). Picklable."""

    def __init__(self, model, fit: LmmFit, free: MixedLMParams | None = None):
        self.model = model
        self.fit_result = fit
        self.freepat = free
        self.reml = fit.reml
        self.method = "REML" if fit.reml else "ML"
        self.use_sqrt = model.use_sqrt
        self.k_fe, self.k_re, self.k_re2, self.k_vc = model.k_fe, model.k_re, model.k_re2, model.k_vc
        self.nobs = model.nobs
        self.converged = fit.converged
        self.scale = float(fit.sigma2)
        self.llf = float(fit.llf)
        self.n_evaluations = fit.optimization.n_evaluations
        self.hist = None
        psi = fit.covariances()
        self._cov_re = psi[0] if self.k_re else np.zeros((0, 0))
        self._vcomp = np.array([p[0, 0] for p in psi[1 if self.k_re else 0 :]])
        self._fe = fit.beta.copy()

    # -- labelling ----------------------------------------------------------------------------------------

    def _series(self, values, names):
        return pd.Series(values, index=names) if self.model._data_is_pandas else np.asarray(values)

    def _frame(self, values, index, columns):
        return pd.DataFrame(values, index=index, columns=columns) if self.model._data_is_pandas else np.asarray(values)

    def _theta_names(self) -> list[str]:
        """A name per theta entry (engine order), for messages."""
        names = [
            f"{self.model.exog_re_names[i]}" + ("" if i == j else f" x {self.model.exog_re_names[j]}")
            for i, j in (self.model._re_template(False).positions if self.k_re else [])
        ]
        return names + list(self.model._vc_names)

    @cached_property
    def _phi_index(self) -> np.ndarray:
        """For each variance parameter in statsmodels' order (tril row-major of cov_re, then vcomp), its index
        in the engine's phi vector (template order, then vcomp, then scale last)."""
        idx = []
        if self.k_re:
            positions = self.model._re_template(False).positions
            idx += [positions.index((i, j)) for i, j in self.model._re_positions()]
        offset = len(idx)
        idx += [offset + j for j in range(self.k_vc)]
        return np.array(idx, dtype=np.int64)

    # -- estimates ---------------------------------------------------------------------------------------

    @property
    def fit_log(self):
        """The optimizer's improvements: evaluation, deviance and elapsed seconds (a DataFrame)."""
        return self.fit_result.fit_log

    @property
    def fe_params(self):
        return self._series(self._fe, self.model.exog_names)

    @property
    def cov_re(self):
        names = self.model.exog_re_names
        return self._frame(self._cov_re, names, names)

    @property
    def cov_re_unscaled(self):
        names = self.model.exog_re_names
        return self._frame(self._cov_re / self.scale, names, names)

    @property
    def vcomp(self) -> np.ndarray:
        return self._vcomp.copy()

    @cached_property
    def params_object(self) -> MixedLMParams:
        return MixedLMParams.from_components(self._fe, self._cov_re / self.scale, vcomp=self._vcomp / self.scale)

    @cached_property
    def _params(self) -> np.ndarray:
        return self.params_object.get_packed(use_sqrt=False, has_fe=True)

    @property
    def params(self):
        return self._series(self._params, self.model.param_names)

    # -- sampling covariance ----------------------------------------------------------------------------

    @cached_property
    def _fixed_variance_parameters(self) -> np.ndarray:
        """statsmodels-order variance parameters held fixed by `free` (their standard error is 0)."""
        free = self.fit_result.free
        engine_free = np.concatenate([free, [True]])
        return ~engine_free[self._phi_index]

    @cached_property
    def _cov_phi(self) -> np.ndarray:
        return self.fit_result.cov_variance_parameters

    @cached_property
    def _cov_params(self) -> np.ndarray:
        """Covariance of `params`: beta block (sigma^2 (R_X'R_X)^{-1}) and, by the delta method, the unscaled
        variance parameters phi_a / scale."""
        k = self.k_fe
        m = self._phi_index.shape[0]
        cov = np.zeros((k + m, k + m))
        cov[:k, :k] = self.fit_result.cov_beta
        phi = self.fit_result.variance_parameters
        s2 = self.scale
        last = phi.shape[0] - 1
        C = self._cov_phi
        bad = np.isnan(np.diag(C))
        Cz = np.where(np.isnan(C), 0.0, C)
        J = np.zeros((m, phi.shape[0]))
        J[np.arange(m), self._phi_index] = 1.0 / s2
        J[:, last] = -phi[self._phi_index] / s2**2
        cu = J @ Cz @ J.T
        unknown = bad[self._phi_index] & ~self._fixed_variance_parameters
        cu[unknown, :] = np.nan
        cu[:, unknown] = np.nan
        fixed = self._fixed_variance_parameters
        cu[fixed, :] = 0.0
        cu[:, fixed] = 0.0
        cov[k:, k:] = cu
        return cov

    def cov_params(self):
        names = self.model.param_names
        return self._frame(self._cov_params, names, names)

    @property
    def bse(self):
        return self._series(np.sqrt(np.diag(self._cov_params)), self.model.param_names)

    @property
    def bse_fe(self):
        return self._series(np.sqrt(np.diag(self._cov_params)[: self.k_fe]), self.model.exog_names)

    @cached_property
    def _bse_re(self) -> np.ndarray:
        se = np.sqrt(np.diag(self._cov_phi))[self._phi_index]
        se[self._fixed_variance_parameters] = 0.0
        return se

    @property
    def bse_re(self):
        """Standard errors of cov_re's lower triangle (row-major) and vcomp, on the variance scale."""
        return self._series(self._bse_re, self.model.param_names[self.k_fe :])

    @property
    def scale_se(self) -> float:
        """Standard error of the residual variance `scale` (not reported by statsmodels)."""
        return float(np.sqrt(self._cov_phi[-1, -1]))

    @property
    def tvalues(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._series(self._params / np.sqrt(np.diag(self._cov_params)), self.model.param_names)

    @property
    def pvalues(self):
        t = np.asarray(self.tvalues, dtype=float)
        return self._series(2 * special.ndtr(-np.abs(t)), self.model.param_names)

    def conf_int(self, alpha=0.05, cols=None):
        q = special.ndtri(1 - checks.check_alpha(alpha) / 2)
        se = np.sqrt(np.diag(self._cov_params))
        ci = np.column_stack([self._params - q * se, self._params + q * se])
        if cols is not None:
            ci = ci[np.asarray(cols)]
        names = np.asarray(self.model.param_names)[cols] if cols is not None else self.model.param_names
        return self._frame(ci, list(names), [0, 1])

    # -- information criteria --------------------------------------------------------------------------

    @property
    def df_modelwc(self) -> int:
        """Estimated parameters counted by aic/bic: the free ones, plus the scale."""
        n_fixed = int(self._fixed_variance_parameters.sum())
        return int(self._params.shape[0] - n_fixed + 1)

    @property
    def aic(self) -> float:
        """As statsmodels: NaN for REML fits (REML likelihoods of different fixed effects are not comparable)."""
        return np.nan if self.reml else float(-2 * self.llf + 2 * self.df_modelwc)

    @property
    def bic(self) -> float:
        return np.nan if self.reml else float(-2 * self.llf + np.log(self.nobs) * self.df_modelwc)

    # -- random effects -------------------------------------------------------------------------------

    def _require_data(self):
        if isinstance(self.fit_result, _RemovedData):
            self.fit_result.data  # raises the error that says remove_data() removed it

    @cached_property
    def _columns_of_group(self) -> list[np.ndarray]:
        """Z columns (engine order) belonging to each group: its exog_re columns, then each VC's columns."""
        self._require_data()
        model = self.model
        per_group = [[] for _ in range(model.n_groups)]
        if self.k_re:
            for g in range(model.n_groups):
                per_group[g].append(np.arange(g * self.k_re, (g + 1) * self.k_re))
        offset = model.n_groups * self.k_re
        for vc in model._vcs:
            order = np.argsort(vc.column_group, kind="stable")
            counts = np.bincount(vc.column_group, minlength=model.n_groups)
            for g, cols in enumerate(np.split(order, np.cumsum(counts)[:-1])):
                per_group[g].append(offset + cols)
            offset += vc.Z.shape[1]
        return [np.concatenate(c) if c else np.zeros(0, np.int64) for c in per_group]

    @cached_property
    def _names_of_group(self) -> list[list[str]]:
        self._require_data()
        model = self.model
        out = []
        offsets = np.cumsum([0] + [vc.Z.shape[1] for vc in model._vcs])
        base = model.n_groups * self.k_re
        for cols in self._columns_of_group:
            names = []
            for c in cols:
                if c < base:
                    names.append(model.exog_re_names[c % self.k_re])
                else:
                    j = int(np.searchsorted(offsets, c - base, side="right") - 1)
                    vc = model._vcs[j]
                    names.append(f"{vc.name}[{vc.column_names[c - base - offsets[j]]}]")
            out.append(names)
        return out

    @cached_property
    def _b(self) -> np.ndarray:
        """Conditional modes of the random effects in Z's column order."""
        return self.fit_result.b

    @cached_property
    def random_effects(self) -> dict:
        """Conditional modes of the random effects, {group label: Series}, on the scale of the data."""
        b = self._b
        return {
            label: pd.Series(b[cols], index=names)
            for label, cols, names in zip(self.model.group_labels, self._columns_of_group, self._names_of_group)
        }

    @cached_property
    def random_effects_cov(self) -> dict:
        """Conditional covariance of each group's random effects given the data, at the estimates."""
        out = {}
        for label, cols, names in zip(self.model.group_labels, self._columns_of_group, self._names_of_group):
            # Var(b | y) = scale x (relative conditional covariance at theta)
            cov = (
                self.fit_result.conditional_covariance(cols) * (self.scale / self.fit_result.sigma2)
                if cols.size
                else np.zeros((0, 0))
            )
            out[label] = pd.DataFrame(cov, index=names, columns=names)
        return out

    @cached_property
    def _fitted(self) -> np.ndarray:
        self._require_data()
        Z = assemble_Z(self.model._terms())
        return self.model.exog @ self._fe + Z @ self._b

    @property
    def fittedvalues(self):
        """X fe_params + Z b: includes the predicted random effects, as statsmodels."""
        return self._rows(self._fitted)

    @property
    def resid(self):
        return self._rows(self.model.endog - self._fitted)

    def _rows(self, values):
        if self.model._data_is_pandas and self.model._row_index is not None:
            return pd.Series(values, index=self.model._row_index)
        return values

    def predict(self, exog=None):
        """The fixed part exog @ fe_params (as statsmodels); a DataFrame goes through the formula."""
        if exog is None:
            self._require_data()
            return self.model.exog @ self._fe
        info = self.model._design_info
        if info is not None and not isinstance(exog, np.ndarray):
            # A formula model reads a data frame (statsmodels also takes a dict of columns); rows with a missing
            # value predict NaN, as the shared new-data path does for every door.
            frame = newdata_path.require_frame(exog, dict_of_columns=True)
            needs = [("fixed effects", newdata_path.model_columns(info))]
            frame = newdata_path.model_frame(frame, needs)
            keep = newdata_path.complete_rows(frame, needs[0][1])
            return newdata_path.predict_rows(frame, keep, lambda rows: newdata_path.fixed_matrix(rows, info) @ self._fe)
        X = np.asarray(exog, dtype=float)
        if X.ndim == 1:
            X = X[:, None] if self.k_fe == 1 else X[None, :]
        if X.shape[1] != self.k_fe:
            raise InputError(
                f"exog has {X.shape[1]} columns but the model has {self.k_fe} fixed effects "
                f"({', '.join(self.model.exog_names)})."
            )
        return X @ self._fe

    # -- profile -----------------------------------------------------------------------------------------

    def profile_re(self, re_ix, vtype, num_low=5, dist_low=1.0, num_high=5, dist_high=1.0, **fit_kwargs):
        """Profile likelihood of one variance parameter (statsmodels' semantics).

        The parameter is held at a grid of values from (estimate - dist_low) to (estimate + dist_high) on
        the variance scale (num_low points below, num_high above) while everything else is re-estimated.
        Returns an array with columns [variance, log-likelihood].
        """
        self._require_data()
        model = self.model
        if vtype == "re":
            ix = int(re_ix)
            if not 0 <= ix < self.k_re:
                raise InputError(f"re_ix={re_ix} is out of range for k_re={self.k_re}.")
            v = self._cov_re[ix, ix]
            order = [ix] + [j for j in range(self.k_re) if j != ix]
            position = 0  # T[0, 0] after moving column ix first
        elif vtype == "vc":
            names = [vc.name for vc in model._vcs]
            if re_ix not in names:
                raise InputError(f"re_ix={re_ix!r} is not a variance component; choose one of {names}.")
            j = names.index(re_ix)
            v = self._vcomp[j]
            order = list(range(self.k_re))
            position = self.model._re_template(False).n_theta * (self.k_re > 0) + j
        else:
            raise InputError("vtype must be one of: 're', 'vc'")
        low, high = (v - dist_low) / self.scale, (v + dist_high) / self.scale
        if low <= 0:
            raise InputError("dist_low is too large and would result in a negative variance. Try a smaller value.")
        v_u = v / self.scale
        grid = np.r_[np.linspace(low, v_u, num_low + 1), np.linspace(v_u, high, num_high + 1)[1:]]

        system = build_system(model.exog, model.endog, model._terms(re_order=order))  # exog_re column ix first
        cov_u = self._cov_re[np.ix_(order, order)] / self.scale
        start = model._theta_from_params(MixedLMParams.from_components(cov_re=cov_u, vcomp=self._vcomp / self.scale))
        free = np.ones(start.shape[0], dtype=bool)
        free[position] = False
        if self.freepat is not None:
            free &= model._free_mask(self.freepat, self.params_object)[_theta_permutation(model, order)]
        rows = []
        for x in grid:
            start[position] = np.sqrt(x)
            opt = optimize_system(
                system, reml=self.reml, start_theta=start, free=free, maxiter=int(fit_kwargs.get("maxiter", 10_000))
            )
            sol = system.solve(opt.theta, self.reml)
            rows.append((x * sol.sigma2, -0.5 * sol.deviance))
            start = opt.theta.copy()
        return np.array(rows)

    # -- tests -------------------------------------------------------------------------------------------------

    def t_test(self, r_matrix, use_t=None) -> "ContrastResults":
        """Tests of linear combinations r_matrix @ fe_params = 0 (statsmodels' MixedLMResults.t_test: fixed
        effects only). Normal reference distribution, as statsmodels' default for MixedLM; use_t=True takes
        the t distribution with nobs - rank(exog) degrees of freedom."""
        R = np.atleast_2d(np.asarray(r_matrix, dtype=float))
        if R.shape[1] != self.k_fe:
            raise InputError(
                f"r_matrix for t-test should have {self.k_fe:d} columns (one per fixed effect: "
                f"{', '.join(self.model.exog_names)}); got {R.shape[1]}."
            )
        cov = self._cov_params[: self.k_fe, : self.k_fe]
        df = self.nobs - self.k_fe if use_t else None
        return ContrastResults(R @ self._fe, np.sqrt(np.diag(R @ cov @ R.T)), df)

    # -- report ----------------------------------------------------------------------------------------------

    def summary(self, yname=None, xname_fe=None, xname_re=None, title=None, alpha=0.05) -> MixedLMSummary:
        return MixedLMSummary(self, yname=yname, xname_fe=xname_fe, xname_re=xname_re, title=title, alpha=alpha)

    def remove_data(self):
        """Drop the data and the fitted system (statsmodels' remove_data), so the results are small (they pickle
        with or without it: sparsemix/formula/pickling.py). params, standard errors, summary() and t_test() keep
        working; what needs the data (fittedvalues, resid, random_effects, profile_re, predict() without exog)
        then raises an error saying so."""
        _ = self._cov_params, self._bse_re  # computed now: they need the fitted system
        for name in ("_b", "_fitted", "random_effects", "random_effects_cov", "_columns_of_group", "_names_of_group"):
            self.__dict__.pop(name, None)
        self.fit_result = _RemovedData()
        self.model._remove_data()

    def __repr__(self):
        return f"<sparsemix MixedLMResults: {self.method}, llf={self.llf:.4f}, converged={self.converged}>"


class _RemovedData:
    """Stands in for the fitted system after remove_data(): anything that needs it says so."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)  # pickle and copy probe for optional dunders
        raise InputError(
            "remove_data() has removed the data and the fitted system this needs; fit the model again to compute it."
        )


class ContrastResults:
    """statsmodels' ContrastResults for t tests: effect, sd, tvalue (= statistic), pvalue, conf_int()."""

    def __init__(self, effect, sd, df_denom=None):
        self.effect = np.asarray(effect, dtype=float)
        self.sd = np.asarray(sd, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.tvalue = self.effect / self.sd
        self.statistic = self.tvalue
        self.df_denom = df_denom
        self.distribution = "norm" if df_denom is None else "t"
        from scipy import stats  # (scipy.stats costs a third of the package's import: loaded where a test asks for it)

        self.dist = stats.norm if df_denom is None else stats.t(df_denom)
        self.pvalue = 2 * self.dist.sf(np.abs(self.tvalue))

    def conf_int(self, alpha=0.05) -> np.ndarray:
        q = self.dist.ppf(1 - checks.check_alpha(alpha) / 2)
        return np.column_stack([self.effect - q * self.sd, self.effect + q * self.sd])

    def summary_frame(self, alpha=0.05) -> pd.DataFrame:
        ci = self.conf_int(alpha)
        stat = "z" if self.df_denom is None else "t"
        return pd.DataFrame(
            {
                "coef": self.effect,
                "std err": self.sd,
                stat: self.tvalue,
                f"P>|{stat}|": self.pvalue,
                "Conf. Int. Low": ci[:, 0],
                "Conf. Int. Upp.": ci[:, 1],
            },
            index=[f"c{i}" for i in range(self.effect.shape[0])],
        )

    def __repr__(self):
        return repr(self.summary_frame())


def _theta_permutation(model, order) -> np.ndarray:
    """Index map from the engine's theta with exog_re columns in `order` to the original theta order."""
    if not model.k_re:
        return np.arange(model.k_vc)
    positions = model._re_template(False).positions
    perm = [positions.index(tuple(sorted((order[i], order[j]), reverse=True))) for i, j in positions]
    return np.concatenate([perm, len(positions) + np.arange(model.k_vc)]).astype(np.int64)
