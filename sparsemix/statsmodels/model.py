"""A drop-in for statsmodels' `MixedLM`: the same constructor, `from_formula`, `fit` and results.

The model keeps statsmodels' vocabulary (groups, exog_re with an unstructured covariance cov_re, variance
components vcomp realised within each group) and translates it into random-effect terms for the sparse
engine: one term for exog_re with one level per group, and one scalar term per variance component with
one level per column. Nothing here is n x q dense.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import checks
from ..core.system import lower_pairs
from ..core.terms import CovarianceTemplate, RandomTerm, VarianceComponent
from ..core.threads import fit_threads
from ..errors import IgnoredArgumentWarning, InputError, SingularFitWarning
from ..fit.optimize import DEFAULT_OPTIMIZER, UNBOUNDED_METHODS, resolve_method
from ..fit.pilot import pilot_start
from ..fit.pipeline import fit_system, row_moments
from ..fit.stages import build_system
from ..formula.mixedlm import fixed_design, formula_columns, random_design, sorted_codes, vc_from_formula
from ..formula.pickling import PicklableResults
from ..formula.safety import formula_environment
from . import likelihood
from .data import ModelData
from .params import MixedLMParams, VCSpec
from .regularized import fit_regularized
from .results import MixedLMResults

__all__ = ["MixedLM", "UnusedArgumentWarning"]

# statsmodels names the default random intercept of the array constructor "Group Var" everywhere
# (cov_re labels, random_effects index, parameter name).
DEFAULT_INTERCEPT_NAME = "Group Var"

# The keywords statsmodels' fit passes on to scipy; any other keyword statsmodels warns about (FutureWarning:
# it will raise), and so does sparsemix. Of these, sparsemix uses maxiter and gtol (and its own `progress`).
STATSMODELS_FIT_KEYWORDS = {"gtol", "maxiter", "eps", "maxcor", "ftol", "tol", "disp", "maxls"}
USED_FIT_KEYWORDS = {"maxiter", "gtol", "progress"}


class UnusedArgumentWarning(IgnoredArgumentWarning, FutureWarning):
    """A fit keyword neither statsmodels' MixedLM.fit nor sparsemix's uses: ignored now, an error in a future
    version (statsmodels' FutureWarning says the same)."""


class MixedLM(PicklableResults):
    """Linear mixed model: endog = exog fe_params + exog_re gamma_group + sum of variance components + error.

    Parameters follow statsmodels.regression.mixed_linear_model.MixedLM. `exog_vc` is a VCSpec or
    statsmodels' dict form {vc_name: {group_label: matrix}}. `missing` is 'none' / 'raise' (NaN or inf is an
    error) or 'drop' (rows with a NaN or inf in any input are dropped).
    """

    def __init__(self, endog, exog, groups, exog_re=None, exog_vc=None, use_sqrt=True, missing="none", **kwargs):
        unknown = set(kwargs) - {"formula", "design_info", "group_name"}
        if unknown:
            raise InputError(
                f"unexpected argument(s) {sorted(unknown)} for MixedLM; see the statsmodels "
                "signature MixedLM(endog, exog, groups, exog_re, exog_vc, use_sqrt, missing)."
            )
        if missing not in ("none", "drop", "raise"):
            raise InputError(f"missing={missing!r} is not one of 'none', 'drop', 'raise'.")
        if isinstance(exog_vc, dict):
            warnings.warn(
                "Using deprecated variance components format (exog_vc as a dict of dicts), as "
                "statsmodels calls it: pass a VCSpec(names, colnames, mats), which statsmodels and "
                "sparsemix both accept.",
                FutureWarning,
                stacklevel=2,
            )
        self.use_sqrt = checks.check_bool(use_sqrt, "use_sqrt")
        self.missing = missing
        self.formula = kwargs.get("formula")
        self._design_info = kwargs.get("design_info")
        self._init_fit_state()
        self._data_is_pandas = isinstance(endog, pd.Series) or isinstance(exog, (pd.DataFrame, pd.Series))
        self._row_index = endog.index if isinstance(endog, pd.Series) else None

        y = checks.as_numeric_vector(endog, "endog")
        n = y.shape[0]
        checks.check_not_empty(n, "endog")
        if exog is None:
            raise InputError("exog is None; pass the fixed-effects design (e.g. a column of ones for an intercept).")
        X = checks.as_numeric_matrix(exog, "exog")
        checks.check_length(X, n, "exog")
        self.endog_names = _series_name(endog, "y")
        self.exog_names = _exog_names(exog, X)
        group_values = checks.check_groups(groups, n)
        if group_values.ndim != 1:
            group_values = group_values.reshape(-1) if group_values.size == n else group_values
        checks.check_length(group_values, n, "groups")
        self.group_name = kwargs.get("group_name", "Group")

        if exog_re is None and exog_vc is None:
            # statsmodels' default: a random intercept per group, whose name is already "Group Var".
            Zre, re_names = np.ones((n, 1)), [DEFAULT_INTERCEPT_NAME]
        elif exog_re is None:
            Zre, re_names = None, []
        else:
            Zre = exog_re if sp.issparse(exog_re) else checks.as_numeric_matrix(exog_re, "exog_re")
            checks.check_length(Zre, n, "exog_re")
            re_names = _exog_re_names(exog_re, Zre.shape[1])
        self.exog_re_names = re_names

        codes, labels = _group_codes(group_values, missing)
        rows_of_group = _rows_of_group(codes, len(labels))
        vcs = _variance_components(exog_vc, labels, rows_of_group)

        keep = _complete_rows(missing, y, X, Zre, vcs, group_values)
        if keep is not None:
            y, X, group_values = y[keep], X[keep], group_values[keep]
            Zre = Zre[keep] if Zre is not None else None
            if self._row_index is not None:
                self._row_index = self._row_index[keep]
            codes, labels, vcs = _regroup(codes[keep], labels, [_take_rows(vc, keep) for vc in vcs])
            checks.check_not_empty(y.shape[0], "the data after dropping incomplete rows")
        self._set_data(y, X, codes, labels, Zre, vcs, group_values)
        self.data = ModelData(self, endog, exog)

    # -- construction helpers ------------------------------------------------------------------------

    def _init_fit_state(self):
        # statsmodels' model remembers the criterion of its last fit: loglike, score and hessian follow it.
        self.reml = True
        self._freepat = None

    def _set_data(self, y, X, codes, labels, Zre, vcs, group_values):
        checks.check_finite(y, "endog")
        checks.check_response_varies(y, self.endog_names)
        checks.check_finite(X, "exog")
        if Zre is not None:
            checks.check_finite(Zre.data if sp.issparse(Zre) else Zre, "exog_re")
        for vc in vcs:
            checks.check_finite(vc.Z.data, f"exog_vc[{vc.name!r}]")
        checks.check_full_rank(X, self.exog_names)
        checks.check_fixed_columns_vs_nobs(X.shape[1], y.shape[0], self.exog_names)
        # One memory layout whatever the constructor (a DataFrame's to_numpy is column-major): BLAS rounds
        # differently by layout, and the same model must give the same numbers from arrays and from formulas.
        X = np.ascontiguousarray(X)
        Zre = Zre if Zre is None or sp.issparse(Zre) else np.ascontiguousarray(Zre)
        self.endog, self.exog, self.groups = np.ascontiguousarray(y), X, group_values
        self.exog_re = Zre
        self._group_codes = codes
        self.group_labels = list(labels)
        self.n_groups = len(labels)
        self.nobs = y.shape[0]
        self.k_fe = X.shape[1]
        self.k_re = 0 if Zre is None else Zre.shape[1]
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self._vcs = list(vcs)
        self.k_vc = len(self._vcs)
        self.row_indices = dict(zip(self.group_labels, _rows_of_group(codes, len(labels))))
        self._group_sizes = np.bincount(codes, minlength=len(labels))
        self._vc_names = [vc.name for vc in self._vcs]
        if self.k_re:
            checks.check_levels(self.n_groups, self.group_name, self.nobs)
        for vc in self._vcs:
            checks.check_levels(vc.Z.shape[1], vc.name, self.nobs)
        self.exog_re_names_full = self._covariance_names()
        self.param_names = self.exog_names + self.exog_re_names_full + [f"{vc.name} Var" for vc in self._vcs]

    @cached_property
    def exog_vc(self) -> VCSpec:
        """The variance components in statsmodels' layout: per component, per group (sorted labels), the
        group's rows x the group's columns, as sparse matrices (statsmodels' use_sparse form). Passing it back
        to MixedLM rebuilds the same model."""
        rows_of_group = list(self.row_indices.values())
        names, colnames, mats = [], [], []
        for vc in self._vcs:
            Zr = sp.csr_matrix(vc.Z)
            cols_of_group = _rows_of_group(vc.column_group, self.n_groups)
            names.append(vc.name)
            colnames.append([[vc.column_names[c] for c in cols] for cols in cols_of_group])
            mats.append([sp.csr_matrix(Zr[rows][:, cols]) for rows, cols in zip(rows_of_group, cols_of_group)])
        return VCSpec(names, colnames, mats)

    def build_system(self, terms: list[RandomTerm] | None = None):
        """The deviance function (lme4's devfun stage): `system.deviance(theta, reml)` over this model's data,
        with theta in the engine's order (exog_re's Cholesky factor column by column, then sqrt(vcomp / scale)).
        `terms`: this model's `_terms()`, where the caller has them already."""
        return build_system(self.exog, self.endog, self._terms() if terms is None else terms)

    def _covariance_names(self) -> list[str]:
        names = self.exog_re_names
        out = []
        if names == [DEFAULT_INTERCEPT_NAME]:
            return [DEFAULT_INTERCEPT_NAME]
        for i in range(self.k_re):
            for j in range(i + 1):
                out.append(f"{names[i]} Var" if i == j else f"{names[j]} x {names[i]} Cov")
        return out

    @classmethod
    def from_formula(
        cls,
        formula,
        data,
        re_formula=None,
        vc_formula=None,
        subset=None,
        use_sparse=False,
        missing="none",
        *args,
        **kwargs,
    ):
        """statsmodels' formula interface: `groups` (a column name or an array) is a required keyword."""
        if "groups" not in kwargs:
            raise InputError(
                "'groups' is a required keyword argument of MixedLM.from_formula: a column name "
                "or an array with one group label per row (use a constant for crossed designs)."
            )
        if not isinstance(data, pd.DataFrame):
            raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
        eval_env = formula_environment(kwargs.pop("eval_env", None))  # the caller's functions, as patsy's
        groups = kwargs.pop("groups")
        use_sqrt = checks.check_bool(kwargs.pop("use_sqrt", True), "use_sqrt")
        checks.check_bool(use_sparse, "use_sparse")
        if args or kwargs:
            raise InputError(f"unexpected argument(s) {sorted(kwargs) or args} for MixedLM.from_formula.")
        if subset is not None:
            data = data.loc[subset]
        vc_formula = checks.check_statsmodels_formulas(formula, re_formula, vc_formula)
        formulas = [formula, re_formula, *vc_formula.values()]
        if isinstance(groups, str):
            checks.require_columns(data, [groups], "groups")
        data = checks.check_column_types(
            data, formula_columns(formulas, data.columns), [groups] if isinstance(groups, str) else [], formulas
        )
        if isinstance(groups, str):
            group_name, group_values = groups, data[groups].to_numpy()
        else:
            group_name, group_values = "Group", checks.check_groups(groups, len(data))
            checks.check_length(group_values, len(data), "groups", reference="data")
        if missing not in ("none", "drop", "raise"):
            raise InputError(f"missing={missing!r} is not one of 'none', 'drop', 'raise'.")
        used = formula_columns(formulas, data.columns)
        if missing == "drop":
            keep = data[used].notna().all(axis=1).to_numpy() & pd.notna(group_values)
            data, group_values = data.loc[keep], group_values[keep]
        checks.check_not_empty(len(data), "data")
        _check_formula_data(data, used, group_values, group_name)

        endog, exog, design_info = fixed_design(formula, data, eval_env)
        codes, labels = _group_codes(group_values, "none")
        rows_of_group = _rows_of_group(codes, len(labels))
        if re_formula is None and not vc_formula:
            Zre, re_names = np.ones((len(data), 1)), [group_name]
        elif re_formula is None:
            Zre, re_names = None, []
        else:
            Zre, re_names = random_design(re_formula, data, group_name, eval_env)
        vcs = [
            vc_from_formula(name, f, data, codes, len(labels), rows_of_group, eval_env)
            for name, f in vc_formula.items()
        ]
        model = cls.__new__(cls)
        model.use_sqrt, model.missing, model.formula = use_sqrt, missing, formula
        model._design_info, model._data_is_pandas, model._row_index = design_info, True, data.index
        model.endog_names, model.exog_names = str(endog.name), list(exog.columns)
        model.exog_re_names, model.group_name = list(re_names), group_name
        model._init_fit_state()
        model._set_data(endog.to_numpy(float), exog.to_numpy(float), codes, labels, Zre, vcs, group_values)
        model.data = ModelData(model, endog, exog, frame=data)
        return model

    # -- the engine's view ----------------------------------------------------------------------------

    def _re_template(self, diagonal: bool) -> CovarianceTemplate:
        return CovarianceTemplate.diagonal(self.k_re) if diagonal else CovarianceTemplate.unstructured(self.k_re)

    def _terms(self, re_order=None) -> list[RandomTerm]:
        """Engine terms: exog_re (columns optionally reordered, for profiling) and one per variance component."""
        terms = []
        if self.k_re:
            order = list(range(self.k_re)) if re_order is None else list(re_order)
            values = self.exog_re[:, order]
            names = [self.exog_re_names[j] for j in order]
            terms.append(
                RandomTerm.from_codes(
                    "re", self._group_codes, values, self.n_groups, self._re_template(False), self.group_labels, names
                )
            )
        terms.extend(vc.to_term(self.group_labels) for vc in self._vcs)
        return terms

    def _re_positions(self) -> list[tuple[int, int]]:
        """statsmodels' row-major lower-triangle order of cov_re entries."""
        return list(lower_pairs(self.k_re))

    def _theta_from_params(self, pa: MixedLMParams) -> np.ndarray:
        parts = []
        if self.k_re:
            parts.append(self._re_template(False).theta_of(pa.cov_re_sqrt()))
        parts.append(np.sqrt(np.maximum(np.asarray(pa.vcomp, dtype=float), 0.0)))
        return np.concatenate(parts)

    def _free_mask(self, free: MixedLMParams, start: MixedLMParams) -> np.ndarray:
        """statsmodels' `free`: a 0 entry holds that parameter (of the Cholesky factor when use_sqrt) at its
        start value."""
        if free.k_re != self.k_re or free.k_vc != self.k_vc:
            raise InputError(
                f"free has k_re={free.k_re}, k_vc={free.k_vc} but the model has k_re={self.k_re}, "
                f"k_vc={self.k_vc}; build it with MixedLMParams.from_components(fe_params, cov_re, "
                "vcomp=...) using 1 for free and 0 for fixed entries."
            )
        parts = []
        if self.k_re:
            tmpl = self._re_template(False)
            mask = np.asarray(free.cov_re, dtype=float) != 0
            fixed_off_diag = [(i, j) for i, j in tmpl.positions if i != j and not mask[i, j]]
            if not self.use_sqrt and fixed_off_diag:
                start_cov = np.asarray(start.cov_re, dtype=float)
                if any(start_cov[i, j] != 0 for i, j in fixed_off_diag) or (
                    self.k_re > 2 and len(fixed_off_diag) < self.k_re2 - self.k_re
                ):
                    raise InputError(
                        "with use_sqrt=False, free can only fix covariances at zero (all of them, "
                        "or k_re = 2); use use_sqrt=True to fix entries of the Cholesky factor."
                    )
            parts.append(np.array([mask[i, j] for i, j in tmpl.positions]))
        parts.append(np.asarray(free.vcomp, dtype=float) != 0)
        return np.concatenate(parts).astype(bool)

    def _start_params(self, start_params) -> MixedLMParams:
        if start_params is None:
            return MixedLMParams.from_components(np.zeros(self.k_fe), np.eye(self.k_re), vcomp=np.ones(self.k_vc))
        if isinstance(start_params, MixedLMParams):
            for part, values in (
                ("fe_params", start_params.fe_params),
                ("cov_re", start_params.cov_re),
                ("vcomp", start_params.vcomp),
            ):
                if values is not None:
                    checks.check_finite_start(np.asarray(values, dtype=float).reshape(-1), f"start_params.{part}")
            return start_params
        sp_ = checks.as_numeric_vector(start_params, "start_params")
        checks.check_finite_start(sp_, "start_params")
        if sp_.shape[0] == self.k_fe + self.k_re2 + self.k_vc:
            return MixedLMParams.from_packed(sp_, self.k_fe, self.k_re, self.use_sqrt, has_fe=True)
        if sp_.shape[0] == self.k_re2 + self.k_vc:
            return MixedLMParams.from_packed(sp_, self.k_fe, self.k_re, self.use_sqrt, has_fe=False)
        raise InputError(
            f"start_params has length {sp_.shape[0]}; expected {self.k_fe + self.k_re2 + self.k_vc} "
            f"(with fixed effects) or {self.k_re2 + self.k_vc} (covariance parameters only), or a "
            "MixedLMParams."
        )

    # -- fitting ----------------------------------------------------------------------------------------

    def fit(
        self,
        start_params=None,
        reml=True,
        niter_sa=0,
        do_cg=True,
        fe_pen=None,
        cov_pen=None,
        free=None,
        full_output=False,
        method=None,
        **fit_kwargs,
    ) -> MixedLMResults:
        """Fit by REML (default) or ML. statsmodels' keywords are accepted; those that have no effect here
        warn (IgnoredArgumentWarning).

        `method` is 'auto' (default: Newton steps with the average information for variance components on
        crossed designs, scoring.py; BOBYQA otherwise), 'bobyqa' (nlopt's bounded derivative-free method, as
        lme4), or scipy's 'lbfgs', 'powell', 'nm'. `maxiter` bounds the deviance evaluations (BOBYQA) or
        iterations (scipy).
        """
        reml = checks.check_bool(reml, "reml")
        do_cg, full_output = checks.check_bool(do_cg, "do_cg"), checks.check_bool(full_output, "full_output")
        maxiter = checks.check_count(fit_kwargs.get("maxiter", 10_000), "maxiter")
        gtol = checks.check_positive_number(fit_kwargs.get("gtol", 1e-7), "gtol")
        if fe_pen is not None or cov_pen is not None:
            raise InputError(
                "penalized fits (fe_pen, cov_pen) are not supported by sparsemix; fit without them "
                "(fit_regularized penalizes the fixed effects)."
            )
        unknown = sorted(k for k in fit_kwargs if k not in STATSMODELS_FIT_KEYWORDS | USED_FIT_KEYWORDS)
        if unknown:
            warnings.warn(
                f"Argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} not used by MixedLM.fit. "
                "Future versions will raise on these arguments.",
                UnusedArgumentWarning,
                stacklevel=2,
            )
        ignored = sorted(k for k in fit_kwargs if k in STATSMODELS_FIT_KEYWORDS - USED_FIT_KEYWORDS)
        if niter_sa:
            ignored.append("niter_sa")
        if not do_cg:
            ignored.append("do_cg")
        if full_output:
            ignored.append("full_output")
        if ignored:
            warnings.warn(
                f"argument(s) {', '.join(ignored)} have no effect in sparsemix's MixedLM.fit.",
                IgnoredArgumentWarning,
                stacklevel=2,
            )
        checks.check_progress(fit_kwargs.get("progress"))
        opt_method = self._optimizer(method)
        start = self._start_params(start_params)
        self.reml, self._freepat = reml, free
        theta0 = self._theta_from_params(start)
        free_mask = None if free is None else self._free_mask(free, start)
        with fit_threads():  # one BLAS thread but where a stage pays for more (core/threads.py)
            terms = self._terms()  # (the system's, the pilot's and the moments': built once)
            system = self.build_system(terms)
            pilot = (
                None
                if start_params is not None
                else (lambda: pilot_start(system, self.exog, self.endog, terms, None, reml))
            )
            fit = fit_system(
                system,
                reml=reml,
                start_theta=theta0 if start_params is not None or free_mask is not None else None,
                moments=row_moments(system, self.exog, self.endog, terms, None),  # (the default start, every door's)
                fallback_start=theta0,  # (statsmodels' default: the identity in the data's columns)
                free=free_mask,
                maxiter=maxiter,
                gtol=gtol,
                method=opt_method,
                progress=fit_kwargs.get("progress"),
                pilot=pilot,
            )
        results = MixedLMResults(self, fit, free)
        self._warn_if_singular(results)
        return results

    def _warn_if_singular(self, results):
        fit = results.fit_result
        if not fit.is_singular:
            return
        names = results._theta_names()
        which = ", ".join(names[i] for i in fit.singular)
        in_cov_re = self.k_re and bool(np.any(fit.singular < self._re_template(False).n_theta))
        # statsmodels' SingularMatrixWarning says "The random effects covariance matrix is singular."
        lead = "The random effects covariance matrix is singular: " if in_cov_re else ""
        warnings.warn(
            f"{lead}boundary (singular) fit: {which} estimated at zero. The model is overparameterized "
            "for these data; consider removing that random effect.",
            SingularFitWarning,
            stacklevel=3,
        )

    def fit_regularized(self, start_params=None, method="l1", alpha=0, ceps=1e-4, ptol=1e-6, maxit=200, **fit_kwargs):
        """Penalized fixed effects with the dependence parameters held at the unpenalized fit (statsmodels'
        semantics; see statsmodels/regularized.py). method="l1" with `alpha` (a number or one weight per fixed
        effect), or a smooth penalty object (func, deriv), such as statsmodels' L2()."""
        return fit_regularized(
            self, start_params=start_params, method=method, alpha=alpha, ceps=ceps, ptol=ptol, maxit=maxit, **fit_kwargs
        )

    @staticmethod
    def _optimizer(method) -> str:
        if isinstance(method, (list, tuple)):
            return MixedLM._optimizer(method[0] if method else None)
        if method is not None and str(method).lower() in UNBOUNDED_METHODS:
            warnings.warn(
                f"method={method!r} cannot keep variances >= 0; sparsemix uses BOBYQA instead.",
                IgnoredArgumentWarning,
                stacklevel=3,
            )
            return DEFAULT_OPTIMIZER
        return resolve_method(method)

    # -- statsmodels' likelihood surface (statsmodels/likelihood.py) ------------------------------------------

    @cached_property
    def _likelihood_system(self):
        return self.build_system()

    def _params_object(self, params, has_fe, use_sqrt=None) -> MixedLMParams:
        if isinstance(params, MixedLMParams):
            return params
        use_sqrt = self.use_sqrt if use_sqrt is None else use_sqrt
        packed = np.asarray(params, dtype=float).reshape(-1)
        expected = self.k_re2 + self.k_vc + (self.k_fe if has_fe else 0)
        if packed.shape[0] != expected:
            what = "fixed effects, then " if has_fe else ""
            raise InputError(
                f"params has length {packed.shape[0]}; expected {expected} ({what}the lower triangle of "
                f"cov_re / scale and vcomp / scale), or a MixedLMParams."
            )
        return MixedLMParams.from_packed(packed, self.k_fe, self.k_re, use_sqrt, has_fe=has_fe)

    def loglike(self, params, profile_fe=True, reml=None) -> float:
        """statsmodels' log-likelihood: the REML or ML one as the model was last fitted (REML before any fit;
        `reml` overrides), scale profiled out, the fixed effects profiled (their GLS estimates) or, with
        profile_fe=False, those of `params`. `params` is a MixedLMParams (cov_re and vcomp relative to scale)
        or the packed covariance parameters (use_sqrt as the model's). -inf where the covariance is not
        positive semi-definite."""
        pa = self._params_object(params, has_fe=False)
        profile_fe = checks.check_bool(profile_fe, "profile_fe")
        reml = self.reml if reml is None else checks.check_bool(reml, "reml")
        with self._likelihood_system.threads():
            return likelihood.loglike_at(self, pa, reml, profile_fe)

    def score(self, params, profile_fe=True) -> np.ndarray:
        """Gradient of loglike in the packed parametrization (use_sqrt as the model's): [fe (if not
        profile_fe), cov_re lower triangle, vcomp]; entries held fixed by the last fit's `free` are zero.
        Central differences (statsmodels/likelihood.py)."""
        pa = self._params_object(params, has_fe=False)
        has_fe = not checks.check_bool(profile_fe, "profile_fe")
        if has_fe and np.asarray(pa.fe_params).shape[0] != self.k_fe:
            raise InputError(
                f"profile_fe=False needs the {self.k_fe} fixed effects in params (a MixedLMParams with fe_params)."
            )
        x = pa.get_packed(use_sqrt=self.use_sqrt, has_fe=has_fe)

        def f(v):
            q = MixedLMParams.from_packed(v, self.k_fe, self.k_re, self.use_sqrt, has_fe=has_fe)
            return likelihood.loglike_at(self, q, self.reml, profile_fe)

        with self._likelihood_system.threads():
            grad = likelihood.central_gradient(f, x)
        if self._freepat is not None:
            free = self._freepat
            mask = np.concatenate(
                [
                    np.asarray(free.fe_params, dtype=float) != 0
                    if has_fe and np.shape(free.fe_params) == (self.k_fe,)
                    else np.ones(self.k_fe * has_fe, bool),
                    free.get_packed(use_sqrt=False, has_fe=False) != 0,
                ]
            )
            grad *= mask
        return grad

    def hessian(self, params) -> tuple[np.ndarray, bool]:
        """statsmodels' hessian: second derivatives of loglike (fixed effects given, scale profiled) in the
        parametrization [fe, cov_re lower triangle, vcomp] without square roots, and whether cov_re is
        singular there. `params` is a MixedLMParams or packed with fixed effects (use_sqrt as the model's).
        Central differences; NaN where the stencil leaves the positive semi-definite cone."""
        pa = self._params_object(params, has_fe=True)
        x = pa.get_packed(use_sqrt=False, has_fe=True)

        def f(v):
            q = MixedLMParams.from_packed(v, self.k_fe, self.k_re, False, has_fe=True)
            return likelihood.loglike_at(self, q, self.reml, profile_fe=False)

        with self._likelihood_system.threads(), np.errstate(invalid="ignore"):
            hess = likelihood.central_hessian(f, x)
        return hess, self.k_re > 0 and likelihood.is_singular(pa.cov_re)

    def get_fe_params(self, cov_re, vcomp, tol=1e-10) -> tuple[np.ndarray, bool]:
        """GLS fixed effects at relative cov_re and vcomp, and whether the covariance is singular (an
        eigenvalue of cov_re, or a vcomp, below tol)."""
        cov_re = np.atleast_2d(np.asarray(cov_re, dtype=float)) if self.k_re else np.zeros((0, 0))
        vcomp = np.asarray(vcomp, dtype=float).reshape(-1)
        theta = likelihood.theta_of(self, cov_re, vcomp)
        if theta is None:
            raise InputError(
                "cov_re is not positive semi-definite (or a vcomp is negative); pass covariance "
                "parameters relative to the scale, as in MixedLMParams."
            )
        with self._likelihood_system.threads():
            _, beta = likelihood.gls_at(self, theta, self.reml)
        sing = bool((cov_re.size and np.linalg.eigvalsh(cov_re).min() < tol) or (vcomp.size and vcomp.min() < tol))
        return beta, sing

    def get_scale(self, fe_params, cov_re, vcomp) -> float:
        """The residual variance profiled at the given fixed effects and relative covariance:
        (y - X fe)' V_rel^-1 (y - X fe) / (n - k_fe) for REML, / n for ML."""
        cov_re = np.atleast_2d(np.asarray(cov_re, dtype=float)) if self.k_re else np.zeros((0, 0))
        theta = likelihood.theta_of(self, cov_re, vcomp)
        if theta is None:
            raise InputError("cov_re is not positive semi-definite (or a vcomp is negative).")
        system = self._likelihood_system
        with system.threads():
            ev, beta_hat = likelihood.gls_at(self, theta, self.reml)
        if ev is None:
            raise InputError(
                "the fixed effects are not estimable at this covariance (X'V^-1X is numerically singular)."
            )
        return likelihood.quadratic_form(ev, beta_hat, fe_params) / system.dof(self.reml)

    def predict(self, params, exog=None) -> np.ndarray:
        """exog @ fe_params: the fixed-effects mean only, as statsmodels. `params` is a MixedLMParams or a
        vector that starts with the fixed effects (the packed parameters, or the fixed effects alone)."""
        X = self.exog if exog is None else np.asarray(exog, dtype=float)
        fe = params.fe_params if isinstance(params, MixedLMParams) else np.asarray(params, dtype=float)[: self.k_fe]
        if X is None:
            raise InputError("the model's data were removed (remove_data()); pass exog.")
        if np.ndim(X) == 1:
            X = X[:, None] if self.k_fe == 1 else X[None, :]
        if X.shape[1] != self.k_fe or np.shape(fe)[0] != self.k_fe:
            raise InputError(
                f"predict needs exog with {self.k_fe} columns and {self.k_fe} fixed effects "
                f"({', '.join(self.exog_names)}); got {X.shape[1]} columns and {np.shape(fe)[0]} values."
            )
        return X @ np.asarray(fe, dtype=float)

    def get_distribution(self, params, scale, exog=None) -> "MixedLMDistribution":
        """Simulate from the model: `params` packed as results.params (fe, cov_re / scale, vcomp / scale)."""
        return MixedLMDistribution(self, params, scale, exog)

    def group_list(self, array):
        """`array` split by group (statsmodels' helper): a list of its rows for each group label, in order."""
        if array is None:
            return None
        array = np.asarray(array)
        return [array[self.row_indices[g]] for g in self.group_labels]

    def _remove_data(self):
        """For results.remove_data(): drop the arrays, keep names and sizes."""
        for name in ("endog", "exog", "exog_re", "groups", "_group_codes", "_vcs", "row_indices", "_row_index"):
            setattr(self, name, None)
        for name in ("_likelihood_system", "exog_vc"):
            self.__dict__.pop(name, None)
        self.data.frame = self.data.orig_endog = self.data.orig_exog = None

    def __repr__(self):
        return (
            f"MixedLM(nobs={self.nobs}, k_fe={self.k_fe}, k_re={self.k_re}, k_vc={self.k_vc}, n_groups={self.n_groups})"
        )


class MixedLMDistribution:
    """statsmodels' _mixedlm_distribution: draws of endog from a MixedLM at given parameters. For the same
    `rng` it makes the same draws, in the same order, as statsmodels (random effects by group, then each
    variance component by group, then the residuals), so seeded simulations agree between the two."""

    def __init__(self, model, params, scale, exog=None):
        pa = MixedLMParams.from_packed(np.asarray(params, dtype=float), model.k_fe, model.k_re, False, True)
        self.model = model
        self.exog = model.exog if exog is None else np.asarray(exog, dtype=float)
        self.fe_params = pa.fe_params
        self.cov_re = scale * pa.cov_re
        self.vcomp = scale * pa.vcomp
        self.scale = float(scale)
        if self.exog is None or model.endog is None:
            raise InputError("the model's data were removed (remove_data()); simulate from a model that has them.")
        if self.exog.shape[0] != model.nobs:
            raise InputError(f"exog has {self.exog.shape[0]} rows; the model's random effects are for {model.nobs}.")
        self._factor = likelihood.psd_factor(self.cov_re) if model.k_re else np.zeros((0, 0))
        if self._factor is None:
            raise InputError("cov_re in params is not positive semi-definite.")

    def rvs(self, n=None, rng=None) -> np.ndarray:
        """One draw of endog (n is ignored, as in statsmodels). `rng`: a seed, a numpy Generator or a
        RandomState."""
        model = self.model
        if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
            rng = np.random.default_rng(rng)
        y = self.exog @ self.fe_params
        if model.k_re:
            u = rng.normal(size=(model.n_groups, model.k_re)) @ self._factor.T
            Zre = model.exog_re.toarray() if sp.issparse(model.exog_re) else model.exog_re
            y = y + (u[model._group_codes] * Zre).sum(1)
        for v, mats in zip(self.vcomp, model.exog_vc.mats):
            for mat, label in zip(mats, model.group_labels):
                rows = model.row_indices[label]
                y[rows] += np.sqrt(v) * (mat @ rng.normal(size=mat.shape[1]))
        return y + np.sqrt(self.scale) * rng.normal(size=y.shape[0])


# -- input helpers (module level: they know arrays, not the model) ----------------------------------------


def _series_name(obj, default):
    name = getattr(obj, "name", None)
    return str(name) if name is not None else default


def _exog_names(exog, X) -> list[str]:
    if isinstance(exog, pd.DataFrame):
        return [str(c) for c in exog.columns]
    if isinstance(exog, pd.Series) and exog.name is not None:
        return [str(exog.name)]
    # statsmodels' rule for arrays: a constant column is "const", the others x1, x2, ...
    names, k = [], 1
    for j in range(X.shape[1]):
        col = X[:, j]
        if X.shape[0] and np.all(col == col[0]) and col[0] != 0:
            names.append("const")
        else:
            names.append(f"x{k}")
            k += 1
    return names


def _exog_re_names(exog_re, k) -> list[str]:
    if isinstance(exog_re, pd.DataFrame):
        return [str(c) for c in exog_re.columns]
    if isinstance(exog_re, pd.Series) and exog_re.name is not None:
        return [str(exog_re.name)]
    return [f"x_re{j + 1}" for j in range(k)]


def _group_codes(values, missing):
    values = np.asarray(values)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            if missing == "drop":
                values = np.where(bad, np.inf, values)  # coded last, dropped with the other incomplete rows
            else:
                checks.check_finite(values, "groups")
    elif values.dtype == object and pd.isna(values).any():
        if missing != "drop":
            raise InputError("groups contains missing labels; pass missing='drop' or label every row.")
        values = np.where(pd.isna(values), "\uffff<missing>", values.astype(str))
    try:
        codes, labels = sorted_codes(values)
    except TypeError:
        raise InputError(
            "groups mixes label types that cannot be sorted (e.g. strings and numbers); convert "
            "the labels to one type, e.g. groups.astype(str)."
        ) from None
    return codes, list(labels)


def _rows_of_group(codes, n_groups) -> list[np.ndarray]:
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=n_groups))[:-1]
    return np.split(order, bounds)


def _variance_components(exog_vc, labels, rows_of_group) -> list[VarianceComponent]:
    if exog_vc is None:
        return []
    if isinstance(exog_vc, VCSpec):
        spec = exog_vc
    elif isinstance(exog_vc, dict):
        names = sorted(exog_vc)
        mats, colnames = [], []
        for name in names:
            per_group = exog_vc[name]
            missing_groups = [g for g in labels if g not in per_group]
            if missing_groups:
                raise InputError(
                    f"exog_vc[{name!r}] has no matrix for group {missing_groups[0]!r}; give one "
                    "(n_g x m) matrix per group label."
                )
            mats.append([per_group[g] for g in labels])
            colnames.append(
                [[str(c) for c in getattr(per_group[g], "columns", range(np.shape(per_group[g])[1]))] for g in labels]
            )
        spec = VCSpec(names, colnames, mats)
    else:
        raise InputError(
            f"exog_vc must be a VCSpec or a dict {{name: {{group: matrix}}}}; got {type(exog_vc).__name__}."
        )
    out = []
    for name, cols, mats in zip(spec.names, spec.colnames, spec.mats):
        if len(mats) != len(labels):
            raise InputError(
                f"variance component {name!r} has matrices for {len(mats)} groups but groups has "
                f"{len(labels)} labels; give one matrix per group, in sorted label order."
            )
        blocks = [(_vc_matrix(m, name), c) for m, c in zip(mats, cols)]
        for (m, c), rows, lab in zip(blocks, rows_of_group, labels):
            if m.shape[0] != len(rows):
                raise InputError(
                    f"variance component {name!r}: the matrix for group {lab!r} has {m.shape[0]} rows "
                    f"but that group has {len(rows)} observations."
                )
            if len(c) != m.shape[1]:
                raise InputError(
                    f"variance component {name!r}: group {lab!r} has {m.shape[1]} columns but {len(c)} column names."
                )
        out.append(VarianceComponent.from_group_blocks(name, blocks, rows_of_group))
    return out


def _vc_matrix(m, name):
    if sp.issparse(m):
        return sp.csr_matrix(m, dtype=float)
    arr = checks.as_numeric_matrix(np.asarray(m), f"exog_vc[{name!r}]")
    return arr


def _complete_rows(missing, y, X, Zre, vcs, group_values):
    """Row mask for missing='drop' (None when nothing is dropped or the policy is not 'drop')."""
    if missing != "drop":
        return None
    keep = np.isfinite(y) & np.isfinite(X).all(axis=1)
    if Zre is not None:
        keep &= _finite_rows(Zre)
    for vc in vcs:
        keep &= _finite_rows(vc.Z)
    keep &= ~pd.isna(group_values)
    if group_values.dtype.kind == "f":
        keep &= np.isfinite(group_values)
    return None if keep.all() else keep


def _finite_rows(M) -> np.ndarray:
    if sp.issparse(M):
        C = sp.coo_matrix(M)
        bad = np.zeros(M.shape[0], dtype=bool)
        bad[C.row[~np.isfinite(C.data)]] = True
        return ~bad
    return np.isfinite(M).all(axis=1)


def _take_rows(vc: VarianceComponent, keep) -> VarianceComponent:
    return VarianceComponent(vc.name, sp.csc_matrix(vc.Z[keep]), vc.column_group, vc.column_names)


def _regroup(codes, labels, vcs):
    """Re-code groups after rows were dropped; drop the VC columns of groups that vanished."""
    present = np.unique(codes)
    new_code = np.full(len(labels), -1, dtype=np.int64)
    new_code[present] = np.arange(present.size)
    out = []
    for vc in vcs:
        cols = np.flatnonzero(new_code[vc.column_group] >= 0)
        out.append(
            VarianceComponent(
                vc.name,
                sp.csc_matrix(vc.Z[:, cols]),
                new_code[vc.column_group[cols]],
                tuple(vc.column_names[c] for c in cols),
            )
        )
    return new_code[codes], [labels[i] for i in present], out


def _check_formula_data(data, used, group_values, group_name):
    for col in used:
        checks.check_complete(data[col], f"column {col!r}")
    if pd.isna(group_values).any():
        raise InputError(f"groups ({group_name!r}) has missing labels; pass missing='drop' or label every row.")
