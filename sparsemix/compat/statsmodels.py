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
import patsy
import scipy.sparse as sp

from .. import checks
from ..errors import IgnoredArgumentWarning, InputError
from ..fitting import build_fit, build_system, optimize_system, warn_if_singular
from ..pilot import pilot_start, pilot_wanted
from ..optimize import DEFAULT_OPTIMIZER, UNBOUNDED_METHODS, resolve_method
from ..formula.mixedlm import fixed_design, formula_columns, random_design, vc_from_formula
from ..formula.safety import formula_environment
from ..terms import CovarianceTemplate, RandomTerm, VarianceComponent, sorted_codes
from .params import MixedLMParams, VCSpec
from .results import MixedLMResults

__all__ = ["MixedLM"]

# statsmodels names the default random intercept of the array constructor "Group Var" everywhere
# (cov_re labels, random_effects index, parameter name).
DEFAULT_INTERCEPT_NAME = "Group Var"


class MixedLM:
    """Linear mixed model: endog = exog fe_params + exog_re gamma_group + sum of variance components + error.

    Parameters follow statsmodels.regression.mixed_linear_model.MixedLM. `exog_vc` is a VCSpec or
    statsmodels' dict form {vc_name: {group_label: matrix}}. `missing` is 'none' / 'raise' (NaN or inf is an
    error) or 'drop' (rows with a NaN or inf in any input are dropped).
    """

    def __init__(self, endog, exog, groups, exog_re=None, exog_vc=None, use_sqrt=True, missing="none",
                 **kwargs):
        unknown = set(kwargs) - {"formula", "design_info", "group_name"}
        if unknown:
            raise InputError(f"unexpected argument(s) {sorted(unknown)} for MixedLM; see the statsmodels "
                             "signature MixedLM(endog, exog, groups, exog_re, exog_vc, use_sqrt, missing).")
        if missing not in ("none", "drop", "raise"):
            raise InputError(f"missing={missing!r} is not one of 'none', 'drop', 'raise'.")
        self.use_sqrt = bool(use_sqrt)
        self.missing = missing
        self.formula = kwargs.get("formula")
        self._design_info = kwargs.get("design_info")
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
        group_values = np.asarray(groups)
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

    # -- construction helpers ------------------------------------------------------------------------

    def _set_data(self, y, X, codes, labels, Zre, vcs, group_values):
        checks.check_finite(y, "endog")
        checks.check_response_varies(y, self.endog_names)
        checks.check_finite(X, "exog")
        if Zre is not None:
            checks.check_finite(Zre.data if sp.issparse(Zre) else Zre, "exog_re")
        for vc in vcs:
            checks.check_finite(vc.Z.data, f"exog_vc[{vc.name!r}]")
        checks.check_full_rank(X, self.exog_names)
        self.endog, self.exog, self.groups = y, X, group_values
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

    def build_system(self):
        """The deviance function (lme4's devfun stage): `system.deviance(theta, reml)` over this model's data,
        with theta in the engine's order (exog_re's Cholesky factor column by column, then sqrt(vcomp / scale))."""
        return build_system(self.exog, self.endog, self._terms())

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
    def from_formula(cls, formula, data, re_formula=None, vc_formula=None, subset=None, use_sparse=False,
                     missing="none", *args, **kwargs):
        """statsmodels' formula interface: `groups` (a column name or an array) is a required keyword."""
        if "groups" not in kwargs:
            raise InputError("'groups' is a required keyword argument of MixedLM.from_formula: a column name "
                             "or an array with one group label per row (use a constant for crossed designs).")
        if not isinstance(data, pd.DataFrame):
            raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
        eval_env = formula_environment(kwargs.pop("eval_env", None))   # the caller's functions, as patsy's
        groups = kwargs.pop("groups")
        use_sqrt = kwargs.pop("use_sqrt", True)
        if args or kwargs:
            raise InputError(f"unexpected argument(s) {sorted(kwargs) or args} for MixedLM.from_formula.")
        if subset is not None:
            data = data.loc[subset]
        if isinstance(groups, str):
            checks.require_columns(data, [groups], "groups")
            group_name, group_values = groups, data[groups].to_numpy()
        else:
            group_name, group_values = "Group", np.asarray(groups)
            checks.check_length(group_values, len(data), "groups", reference="data")
        if missing not in ("none", "drop", "raise"):
            raise InputError(f"missing={missing!r} is not one of 'none', 'drop', 'raise'.")
        vc_formula = dict(sorted((vc_formula or {}).items()))
        formulas = [formula, re_formula, *vc_formula.values()]
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
        vcs = [vc_from_formula(name, f, data, codes, len(labels), rows_of_group, eval_env)
               for name, f in vc_formula.items()]
        model = cls.__new__(cls)
        model.use_sqrt, model.missing, model.formula = bool(use_sqrt), missing, formula
        model._design_info, model._data_is_pandas, model._row_index = design_info, True, data.index
        model.endog_names, model.exog_names = str(endog.name), list(exog.columns)
        model.exog_re_names, model.group_name = list(re_names), group_name
        model.data = data
        model._set_data(endog.to_numpy(float), exog.to_numpy(float), codes, labels, Zre, vcs, group_values)
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
            terms.append(RandomTerm.from_codes("re", self._group_codes, values, self.n_groups,
                                               self._re_template(False), self.group_labels, names))
        terms.extend(vc.to_term(self.group_labels) for vc in self._vcs)
        return terms

    def _re_positions(self) -> list[tuple[int, int]]:
        """statsmodels' row-major lower-triangle order of cov_re entries."""
        return list(zip(*[a.tolist() for a in np.tril_indices(self.k_re)]))

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
            raise InputError(f"free has k_re={free.k_re}, k_vc={free.k_vc} but the model has k_re={self.k_re}, "
                             f"k_vc={self.k_vc}; build it with MixedLMParams.from_components(fe_params, cov_re, "
                             "vcomp=...) using 1 for free and 0 for fixed entries.")
        parts = []
        if self.k_re:
            tmpl = self._re_template(False)
            mask = np.asarray(free.cov_re, dtype=float) != 0
            fixed_off_diag = [(i, j) for i, j in tmpl.positions if i != j and not mask[i, j]]
            if not self.use_sqrt and fixed_off_diag:
                start_cov = np.asarray(start.cov_re, dtype=float)
                if any(start_cov[i, j] != 0 for i, j in fixed_off_diag) or (
                        self.k_re > 2 and len(fixed_off_diag) < self.k_re2 - self.k_re):
                    raise InputError("with use_sqrt=False, free can only fix covariances at zero (all of them, "
                                     "or k_re = 2); use use_sqrt=True to fix entries of the Cholesky factor.")
            parts.append(np.array([mask[i, j] for i, j in tmpl.positions]))
        parts.append(np.asarray(free.vcomp, dtype=float) != 0)
        return np.concatenate(parts).astype(bool)

    def _start_params(self, start_params) -> MixedLMParams:
        if start_params is None:
            return MixedLMParams.from_components(np.zeros(self.k_fe), np.eye(self.k_re), vcomp=np.ones(self.k_vc))
        if isinstance(start_params, MixedLMParams):
            return start_params
        sp_ = np.asarray(start_params, dtype=float)
        if sp_.shape[0] == self.k_fe + self.k_re2 + self.k_vc:
            return MixedLMParams.from_packed(sp_, self.k_fe, self.k_re, self.use_sqrt, has_fe=True)
        if sp_.shape[0] == self.k_re2 + self.k_vc:
            return MixedLMParams.from_packed(sp_, self.k_fe, self.k_re, self.use_sqrt, has_fe=False)
        raise InputError(f"start_params has length {sp_.shape[0]}; expected {self.k_fe + self.k_re2 + self.k_vc} "
                         f"(with fixed effects) or {self.k_re2 + self.k_vc} (covariance parameters only), or a "
                         "MixedLMParams.")

    # -- fitting ----------------------------------------------------------------------------------------

    def fit(self, start_params=None, reml=True, niter_sa=0, do_cg=True, fe_pen=None, cov_pen=None, free=None,
            full_output=False, method=None, **fit_kwargs) -> MixedLMResults:
        """Fit by REML (default) or ML. statsmodels' keywords are accepted; those that have no effect here
        warn (IgnoredArgumentWarning).

        `method` is 'auto' (default: Newton steps with the average information for variance components on
        crossed designs, scoring.py; BOBYQA otherwise), 'bobyqa' (nlopt's bounded derivative-free method, as
        lme4), or scipy's 'lbfgs', 'powell', 'nm'. `maxiter` bounds the deviance evaluations (BOBYQA) or
        iterations (scipy).
        """
        if fe_pen is not None or cov_pen is not None:
            raise InputError("penalized fits (fe_pen, cov_pen) are not supported by sparsemix; fit without them.")
        ignored = sorted(k for k in fit_kwargs if k not in {"maxiter", "gtol", "progress"})
        if niter_sa:
            ignored.append("niter_sa")
        if not do_cg:
            ignored.append("do_cg")
        if full_output:
            ignored.append("full_output")
        if ignored:
            warnings.warn(f"argument(s) {', '.join(ignored)} have no effect in sparsemix's MixedLM.fit.",
                          IgnoredArgumentWarning, stacklevel=2)
        checks.check_progress(fit_kwargs.get("progress"))
        opt_method = self._optimizer(method)
        start = self._start_params(start_params)
        theta0 = self._theta_from_params(start)
        free_mask = None if free is None else self._free_mask(free, start)
        system = self.build_system()
        step = None
        if pilot_wanted(start_params, opt_method, free):
            pilot = pilot_start(system, self.exog, self.endog, self._terms(), None, bool(reml))
            if pilot is not None:
                theta0, step = pilot
        opt = optimize_system(system, reml=bool(reml), start_theta=theta0, free=free_mask,
                              maxiter=int(fit_kwargs.get("maxiter", 10_000)), gtol=float(fit_kwargs.get("gtol", 1e-7)),
                              method=opt_method, progress=fit_kwargs.get("progress"), initial_step=step)
        fit = build_fit(system, opt, bool(reml), free_mask)
        results = MixedLMResults(self, fit, free)
        warn_if_singular(fit, results._theta_names())
        return results

    @staticmethod
    def _optimizer(method) -> str:
        if isinstance(method, (list, tuple)):
            return MixedLM._optimizer(method[0] if method else None)
        if method is not None and str(method).lower() in UNBOUNDED_METHODS:
            warnings.warn(f"method={method!r} cannot keep variances >= 0; sparsemix uses BOBYQA instead.",
                          IgnoredArgumentWarning, stacklevel=3)
            return DEFAULT_OPTIMIZER
        return resolve_method(method)

    def loglike(self, params, reml=True) -> float:
        """Profile log-likelihood at packed covariance parameters (or a MixedLMParams), fe and scale profiled."""
        pa = params if isinstance(params, MixedLMParams) else self._start_params(params)
        system = self.build_system()
        return -0.5 * system.deviance(self._theta_from_params(pa), reml)

    def __repr__(self):
        return (f"MixedLM(nobs={self.nobs}, k_fe={self.k_fe}, k_re={self.k_re}, k_vc={self.k_vc}, "
                f"n_groups={self.n_groups})")


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
                values = np.where(bad, np.inf, values)   # coded last, dropped with the other incomplete rows
            else:
                checks.check_finite(values, "groups")
    elif values.dtype == object and pd.isna(values).any():
        if missing != "drop":
            raise InputError("groups contains missing labels; pass missing='drop' or label every row.")
        values = np.where(pd.isna(values), "\uffff<missing>", values.astype(str))
    try:
        codes, labels = sorted_codes(values)
    except TypeError:
        raise InputError("groups mixes label types that cannot be sorted (e.g. strings and numbers); convert "
                         "the labels to one type, e.g. groups.astype(str).") from None
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
                raise InputError(f"exog_vc[{name!r}] has no matrix for group {missing_groups[0]!r}; give one "
                                 "(n_g x m) matrix per group label.")
            mats.append([per_group[g] for g in labels])
            colnames.append([[str(c) for c in getattr(per_group[g], "columns", range(np.shape(per_group[g])[1]))]
                             for g in labels])
        spec = VCSpec(names, colnames, mats)
    else:
        raise InputError(f"exog_vc must be a VCSpec or a dict {{name: {{group: matrix}}}}; got {type(exog_vc).__name__}.")
    out = []
    for name, cols, mats in zip(spec.names, spec.colnames, spec.mats):
        if len(mats) != len(labels):
            raise InputError(f"variance component {name!r} has matrices for {len(mats)} groups but groups has "
                             f"{len(labels)} labels; give one matrix per group, in sorted label order.")
        blocks = [(_vc_matrix(m, name), c) for m, c in zip(mats, cols)]
        for (m, c), rows, lab in zip(blocks, rows_of_group, labels):
            if m.shape[0] != len(rows):
                raise InputError(f"variance component {name!r}: the matrix for group {lab!r} has {m.shape[0]} rows "
                                 f"but that group has {len(rows)} observations.")
            if len(c) != m.shape[1]:
                raise InputError(f"variance component {name!r}: group {lab!r} has {m.shape[1]} columns but "
                                 f"{len(c)} column names.")
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
        out.append(VarianceComponent(vc.name, sp.csc_matrix(vc.Z[:, cols]), new_code[vc.column_group[cols]],
                                     tuple(vc.column_names[c] for c in cols)))
    return new_code[codes], [labels[i] for i in present], out


def _check_formula_data(data, used, group_values, group_name):
    for col in used:
        checks.check_complete(data[col], f"column {col!r}")
    if pd.isna(group_values).any():
        raise InputError(f"groups ({group_name!r}) has missing labels; pass missing='drop' or label every row.")
