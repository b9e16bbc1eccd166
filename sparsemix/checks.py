"""Input checks: small named functions, each raising an InputError that names the problem and the fix."""
from __future__ import annotations

import difflib

import numpy as np
import pandas as pd

from .errors import InputError, MissingDataError, RankDeficientError

__all__ = [
    "require_columns", "as_numeric_vector", "as_numeric_matrix", "check_finite", "check_complete", "check_not_empty",
    "check_length", "check_full_rank", "check_levels", "check_levels_below_observations",
    "require_numeric_column", "check_response_varies",
]


def require_columns(data: pd.DataFrame, names, role: str) -> None:
    """Every name must be a column of `data`; suggest the closest column otherwise."""
    for name in names:
        if name not in data.columns:
            close = difflib.get_close_matches(str(name), [str(c) for c in data.columns], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(f"{role} refers to column {name!r}, which is not in the data.{hint} "
                             f"Available columns: {', '.join(map(str, data.columns[:20]))}.")


def check_not_empty(n: int, what: str = "the data") -> None:
    if n == 0:
        raise InputError(f"{what} has no rows; pass a data set with at least one observation per group.")


def as_numeric_vector(values, name: str) -> np.ndarray:
    """A 1-D float array; non-numeric content (strings, objects) is an error, not a silent cast."""
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional; got an array of shape {arr.shape}.")
    return _as_float(arr, name, "Convert it (e.g. pd.to_numeric) or choose a numeric column.")


def as_numeric_matrix(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 1-D or 2-D array; got shape {arr.shape}.")
    return _as_float(arr, name, "Encode categorical columns as indicators (e.g. with a formula and C()) first.")


def _as_float(arr: np.ndarray, name: str, fix: str) -> np.ndarray:
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.number):
        return np.array(arr, dtype=float)   # an owned, writable copy: pandas and patsy hand out read-only views
    try:
        return arr.astype(float)
    except (TypeError, ValueError):
        sample = next((v for v in arr.ravel() if not _is_number(v)), None)
        raise InputError(f"{name} must be numeric; it holds non-numeric values such as {sample!r}. {fix}") from None


def check_finite(arr: np.ndarray, name: str, missing_hint: bool = True) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(arr.shape[0], -1).any(axis=1))
        kind = "NaN" if np.isnan(arr).any() else "infinite"
        hint = (" Pass missing='drop' to drop incomplete rows, or clean the data first."
                if missing_hint else " Remove or replace those values.")
        raise MissingDataError(f"{name} contains {kind} values in {rows.size} row(s) (first at row "
                               f"{rows[0]}).{hint}")


def check_complete(values: pd.Series, name: str) -> None:
    """A data column used by a formula: no missing values; numeric columns also no infinities."""
    missing = np.flatnonzero(values.isna().to_numpy())
    if missing.size:
        raise MissingDataError(f"{name} contains missing values in {missing.size} row(s) (first at row "
                               f"{missing[0]}). Pass missing='drop' to drop incomplete rows, or fill them first.")
    if pd.api.types.is_numeric_dtype(values):
        check_finite(values.to_numpy(dtype=float), name, missing_hint=False)


def check_length(arr, n: int, name: str, reference: str = "endog") -> None:
    rows = arr.shape[0] if hasattr(arr, "shape") else len(arr)
    if rows != n:
        raise InputError(f"{name} has {rows} rows but {reference} has {n}; they must describe the same "
                         "observations, one row each.")


def check_full_rank(X: np.ndarray, names: list[str]) -> None:
    """Raise if the columns of X are linearly dependent, naming a column that is aliased."""
    if X.shape[1] == 0:
        return
    if X.shape[0] < X.shape[1]:
        raise RankDeficientError(f"the fixed-effects design has {X.shape[1]} columns but only {X.shape[0]} "
                                 "rows; remove fixed-effect terms.")
    # Scale columns so the rank decision does not depend on units.
    norms = np.linalg.norm(X, axis=0)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise RankDeficientError(f"fixed-effects column {names[zero[0]]!r} is all zeros; remove it.")
    Xs = X / norms
    _, R = np.linalg.qr(Xs)
    d = np.abs(np.diag(R))
    tol = d.max() * max(X.shape) * np.finfo(float).eps * 10
    rank = int(np.sum(d > tol))
    if rank < X.shape[1]:
        # The first column that is (numerically) a combination of the ones before it.
        for j in range(1, X.shape[1] + 1):
            if np.linalg.matrix_rank(Xs[:, :j], tol=tol) < j:
                raise RankDeficientError(
                    f"the fixed-effects design is rank deficient (rank {rank} < {X.shape[1]} columns): column "
                    f"{names[j - 1]!r} is a linear combination of the columns before it. Drop it or the "
                    "columns it duplicates.")


def check_progress(progress) -> None:
    """`progress` is None or a function of (evaluation, deviance, seconds), called after each evaluation."""
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function called as progress(evaluation, deviance, seconds), or None; "
                         f"got {progress!r}. To have the progress printed, pass verbose=True to lmer, or "
                         "progress=sparsemix.progress.ProgressPrinter().")


def check_levels(n_levels: int, name: str, n_obs: int) -> None:
    if n_levels < 2:
        raise InputError(f"grouping factor {name!r} has only {n_levels} level; a variance between groups "
                         "cannot be estimated from one group. Remove that random effect or use a factor with "
                         "more levels.")


def require_numeric_column(values: pd.Series, name: str) -> None:
    """A column used as numbers must hold numbers (a CSV column with one stray word is read as text)."""
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        return
    sample = next((v for v in values if not _is_number(v)), values.iloc[0] if len(values) else None)
    raise InputError(f"{name} must be numeric; its column holds text (dtype {values.dtype}) such as {sample!r}. "
                     "Convert it (e.g. pd.to_numeric(..., errors='coerce') to turn stray text into missing "
                     "values) or choose a numeric column.")


def check_levels_below_observations(n_levels: int, name: str, n_obs: int) -> None:
    """lme4's check.nobs.vs.nlev: one observation per level confounds the random effect with the residual."""
    if n_levels >= n_obs:
        raise InputError(f"grouping factor {name!r} has {n_levels} levels for {n_obs} observations; with (at "
                         "most) one observation per level its variance cannot be told apart from the residual "
                         "variance. Remove that random effect, or group by a coarser factor.")


def check_response_varies(y: np.ndarray, name: str) -> None:
    """A constant response has no variance to split between random effects and residual."""
    if y.shape[0] and np.ptp(y) == 0:
        raise InputError(f"the response {name!r} is constant ({y[0]:g} in every row); there is nothing to model. "
                         "Check that the right column is used as the response.")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
