"""Input checks: small named functions, each raising an InputError that names the problem and the fix."""

from __future__ import annotations

import difflib
import functools
import numbers

import numpy as np
import pandas as pd

from .errors import InputError, MissingDataError, RankDeficientError

# The formula functions that read one column as a factor, its levels the column's values: patsy's C and R's factor
# (formula/factor.py: C under R's name). One list for every rule about an explicit factor (here, and the kept designs
# of formula/mixedlm.py); held here, the lowest layer that reads formulas' text.
FACTOR_FUNCTIONS = ("C", "factor")

__all__ = [
    "require_columns",
    "as_numeric_vector",
    "as_numeric_matrix",
    "check_finite",
    "check_complete",
    "check_not_empty",
    "check_length",
    "check_full_rank",
    "check_levels",
    "check_levels_below_observations",
    "require_numeric_column",
    "check_response_varies",
    "check_bool",
    "check_count",
    "check_positive_number",
    "check_level",
    "check_alpha",
    "check_seed",
    "check_start",
    "check_finite_start",
    "check_weights_scale",
    "check_nobs_vs_n_random_effects",
    "check_groups",
    "check_column_types",
    "readable_columns",
]


def require_columns(data: pd.DataFrame, names, role: str) -> None:
    """Every name must be a column of `data`; suggest the closest column otherwise."""
    for name in names:
        if name not in data.columns:
            close = difflib.get_close_matches(str(name), [str(c) for c in data.columns], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"{role} refers to column {name!r}, which is not in the data.{hint} "
                f"Available columns: {', '.join(map(str, data.columns[:20]))}."
            )


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
        return np.array(arr, dtype=float)  # an owned, writable copy: pandas and patsy hand out read-only views
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
        hint = (
            " Pass missing='drop' to drop incomplete rows, or clean the data first."
            if missing_hint
            else " Remove or replace those values."
        )
        raise MissingDataError(f"{name} contains {kind} values in {rows.size} row(s) (first at row {rows[0]}).{hint}")


def check_complete(values: pd.Series, name: str) -> None:
    """A data column used by a formula: no missing values; numeric columns also no infinities."""
    missing = np.flatnonzero(values.isna().to_numpy())
    if missing.size:
        raise MissingDataError(
            f"{name} contains missing values in {missing.size} row(s) (first at row "
            f"{missing[0]}). Pass missing='drop' to drop incomplete rows, or fill them first."
        )
    if pd.api.types.is_numeric_dtype(values):
        check_finite(values.to_numpy(dtype=float), name, missing_hint=False)


def check_length(arr, n: int, name: str, reference: str = "endog") -> None:
    rows = arr.shape[0] if hasattr(arr, "shape") else len(arr)
    if rows != n:
        raise InputError(
            f"{name} has {rows} rows but {reference} has {n}; they must describe the same observations, one row each."
        )


def check_full_rank(X: np.ndarray, names: list[str]) -> None:
    """Raise if the columns of X are linearly dependent, naming a column that is aliased."""
    if X.shape[1] == 0:
        return
    if X.shape[0] < X.shape[1]:
        raise RankDeficientError(
            f"the fixed-effects design has {X.shape[1]} columns but only {X.shape[0]} rows; remove fixed-effect terms."
        )
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
                    "columns it duplicates."
                )


def check_progress(progress) -> None:
    """`progress` is None or a function of (evaluation, deviance, seconds), called after each evaluation."""
    if progress is not None and not callable(progress):
        raise InputError(
            f"progress must be a function called as progress(evaluation, deviance, seconds), or None; "
            f"got {progress!r}. To have the progress printed, pass verbose=True to lmer, or "
            "progress=sparsemix.progress.ProgressPrinter()."
        )


def check_levels(n_levels: int, name: str, n_obs: int) -> None:
    if n_levels < 2:
        raise InputError(
            f"grouping factor {name!r} has only {n_levels} level; a variance between groups "
            "cannot be estimated from one group. Remove that random effect or use a factor with "
            "more levels."
        )


def require_numeric_column(values: pd.Series, name: str) -> None:
    """A column used as numbers must hold numbers (a CSV column with one stray word is read as text)."""
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        return
    sample = next((v for v in values if not _is_number(v)), values.iloc[0] if len(values) else None)
    raise InputError(
        f"{name} must be numeric; its column holds text (dtype {values.dtype}) such as {sample!r}. "
        "Convert it (e.g. pd.to_numeric(..., errors='coerce') to turn stray text into missing "
        "values) or choose a numeric column."
    )


def check_levels_below_observations(n_levels: int, name: str, n_obs: int) -> None:
    """lme4's check.nobs.vs.nlev: one observation per level confounds the random effect with the residual."""
    if n_levels >= n_obs:
        raise InputError(
            f"grouping factor {name!r} has {n_levels} levels for {n_obs} observations; with (at "
            "most) one observation per level its variance cannot be told apart from the residual "
            "variance. Remove that random effect, or group by a coarser factor."
        )


def check_response_varies(y: np.ndarray, name: str) -> None:
    """A constant response has no variance to split between random effects and residual; a response whose
    squares overflow or underflow cannot be fitted either (see RESPONSE_SCALE_LIMIT)."""
    if not y.shape[0]:
        return
    lo, hi = float(np.min(y)), float(np.max(y))
    if lo == hi:
        raise InputError(
            f"the response {name!r} is constant ({y[0]:g} in every row); there is nothing to model. "
            "Check that the right column is used as the response."
        )
    big = max(-lo, hi)
    # n values that span hi - lo have a standard deviation of at least (hi - lo) / sqrt(2 n): the std's passes over
    # the rows (0.9 s of 32,000,000) only where that bound does not settle it
    spread = (hi - lo) / np.sqrt(2.0 * y.shape[0])
    if spread < 1 / RESPONSE_SCALE_LIMIT:
        spread = float(np.std(y / big)) * big  # divided first: the std of values near 1e200 overflows
    if big > RESPONSE_SCALE_LIMIT or spread < 1 / RESPONSE_SCALE_LIMIT:
        what = (
            f"values as large as {big:.3g}: their squares, which the fit sums, would overflow"
            if big > RESPONSE_SCALE_LIMIT
            else f"a standard deviation of only {spread:.3g}: its squares, which the fit sums, would underflow"
        )
        raise InputError(
            f"the response {name!r} has {what} double precision (responses between "
            f"1/{RESPONSE_SCALE_LIMIT:g} and "
            f"{RESPONSE_SCALE_LIMIT:g} in size and spread are fitted). Rescale it, e.g. fit "
            "(y - y.mean()) / y.std(), and scale the fixed effects, standard deviations and sigma "
            "back by the same factor."
        )


# Responses are refused beyond 1e100 in size and below 1e-100 in spread: their squares (1e+-200) then leave
# 1e100 of headroom for sums over rows, weights and covariates before double precision's 1e+-308 (measured:
# the fit is scale-equivariant to 1e-9 from 1e-153 to 1e152; 1e-200 gave sigma 0 and 1e200 a NaN sigma).
RESPONSE_SCALE_LIMIT = 1e100
# Weights are relative (all of them times c changes only sigma, by 1/sqrt(c)); their typical size (geometric
# mean) moves theta away from 1 by its square root, and beyond this BOBYQA's bounds and tolerances no longer fit
# it (measured: 1e8 gave theta to 4e-8, 1e10 to 2e-4, 1e12 and 1e-16 wrong theta and converged=True).
WEIGHTS_SCALE_LIMIT = 1e8


def check_random_columns(values: np.ndarray, columns, term: str) -> None:
    """The columns of a random-effects term (its slopes' covariates): finite, and no larger than the response may
    be, since the fit sums their squares and products with theta (a slope on a covariate of size 1e200 overflowed
    to a singular relative covariance: numpy's LinAlgError)."""
    check_finite(values, f"the columns of random-effects term {term}", missing_hint=False)
    big = np.abs(values).max(axis=0, initial=0.0) if values.size else np.zeros(len(columns))
    if np.any(big > RESPONSE_SCALE_LIMIT):
        j = int(np.argmax(big))
        raise InputError(
            f"the column {columns[j]!r} of random-effects term {term} has values as large as "
            f"{big[j]:.3g}; their squares, which the fit sums, overflow double precision (columns up to "
            f"{RESPONSE_SCALE_LIMIT:g} in size are fitted). Rescale the covariate, e.g. divide it by "
            "a power of ten, and scale its variance and fixed effect back by the same factor."
        )


def check_weights_scale(w: np.ndarray, name: str = "weights") -> None:
    """Prior weights whose typical size is far from 1, or whose range would under/overflow the weighted squares."""
    log_w = np.log(w)
    typical = float(np.exp(np.mean(log_w)))
    ratio = float(np.exp(np.max(log_w) - np.min(log_w)))
    if not 1 / WEIGHTS_SCALE_LIMIT <= typical <= WEIGHTS_SCALE_LIMIT or ratio > RESPONSE_SCALE_LIMIT:
        raise InputError(
            f"{name} range from {np.min(w):.3g} to {np.max(w):.3g} (typical size {typical:.3g}); "
            f"weights must have a typical size between 1/{WEIGHTS_SCALE_LIMIT:g} and "
            f"{WEIGHTS_SCALE_LIMIT:g} and span at most a factor {RESPONSE_SCALE_LIMIT:g}. Weights are "
            "relative: divide them by their mean (only sigma changes, by the square root of that "
            "mean)."
        )


# -- arguments (the numbers and switches users pass to the front doors) -----------------------------------------


def check_bool(value, name: str) -> bool:
    """A switch takes True or False (numpy's bools too), nothing else: reml="no" is truthy, reml=None falsy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputError(
        f"{name} must be True or False; got {value!r} ({type(value).__name__}). Strings, numbers and "
        f"None are not read as switches: pass {name}=True or {name}=False."
    )


# The largest count an argument may take: the C int that nlopt's maxeval and numpy's sizes are read into. A
# larger Python int reached np.isfinite as an object (TypeError) and nlopt as an OverflowError.
COUNT_LIMIT = 2**31 - 1


def check_count(value, name: str, minimum: int = 1, maximum: int = COUNT_LIMIT) -> int:
    """A whole number from minimum to maximum (numpy integers and integral floats such as 1e4 too; not bools)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or (not isinstance(value, numbers.Integral) and not (np.isfinite(value) and float(value).is_integer()))
    ):
        raise InputError(f"{name} must be a whole number >= {minimum}; got {value!r} ({type(value).__name__}).")
    if int(value) < minimum:
        raise InputError(f"{name} must be a whole number >= {minimum}; got {value!r}.")
    if int(value) > maximum:
        raise InputError(
            f"{name} must be a whole number from {minimum} to {maximum:,}; got {value!r:.30}. Pass a smaller number."
        )
    return int(value)


def check_positive_number(value, name: str) -> float:
    """A finite number > 0 (a tolerance, a step)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise InputError(f"{name} must be a finite number > 0; got {value!r} ({type(value).__name__}).")
    return float(value)


def check_level(level, name: str = "level") -> float:
    """A confidence level: a number strictly between 0 and 1 (0.95, not 95)."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        hint = (
            f" (for {level:g}% pass {level / 100:g})" if isinstance(level, numbers.Real) and 50 <= level < 100 else ""
        )
        raise InputError(f"{name} must be a number strictly between 0 and 1, such as 0.95; got {level!r}{hint}.")
    return float(level)


def check_alpha(alpha, name: str = "alpha") -> float:
    """A significance level: a number strictly between 0 and 1 (0.05 for 95% intervals)."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise InputError(
            f"{name} must be a number strictly between 0 and 1, such as 0.05 for 95% intervals; got {alpha!r}."
        )
    return float(alpha)


def check_seed(seed, name: str = "seed", generators: bool = True):
    """None, a non-negative integer, or (where numpy accepts one) a SeedSequence or Generator."""
    if seed is None or (generators and isinstance(seed, (np.random.Generator, np.random.SeedSequence))):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) and seed >= 0:
        return int(seed)
    kinds = (
        "None, a non-negative integer, or a numpy Generator or SeedSequence"
        if generators
        else "None or a non-negative integer"
    )
    raise InputError(f"{name} must be {kinds}; got {seed!r} ({type(seed).__name__}).")


def check_finite_start(arr: np.ndarray, name: str, label=None) -> None:
    """Start values are finite numbers (named by position, or by `label(i)`)."""
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        where = f"{name}[{bad[0]}]" if label is None else label(bad[0])
        raise InputError(
            f"{where} is {arr[bad[0]]}; every start value must be a finite number. Leave {name} out "
            "for the default start."
        )


# A start farther out than this (a random effect's sd 1e10 times sigma's) only reaches rank-deficiency errors.
START_LIMIT = 1e10


def check_start(start, lower: np.ndarray, name: str = "start", names=None, limit: float | None = None) -> np.ndarray:
    """The optimizer's start (theta): as many finite numbers as the model has, within their bounds. Checked
    before any optimizer sees it: a NaN or inf reached nlopt's BOBYQA and corrupted the process's memory
    (optimize._bobyqa)."""
    n = len(lower)
    label = (lambda i: f"{name}[{i}]") if names is None else (lambda i: f"{name}[{i}] ({names[i]})")
    try:
        arr = np.array(start, dtype=float).reshape(-1) if np.ndim(start) <= 1 else None
    except (TypeError, ValueError):
        arr = None
    if arr is None:
        raise InputError(
            f"{name} must be a vector of {n} number(s) (theta: each random-effects term's relative "
            f"Cholesky factor); got {start!r}."
        )
    if arr.shape[0] != n:
        raise InputError(
            f"{name} has {arr.shape[0]} value(s) but the model has {n} theta parameter(s)"
            + (f" ({', '.join(names)})" if names is not None else "")
            + "; pass one per parameter, or "
            "leave it out for the default start."
        )
    check_finite_start(arr, name, label)
    below = np.flatnonzero(arr < lower)
    if below.size:
        i = below[0]
        raise InputError(
            f"{label(i)} is {arr[i]:g}, below its lower bound {lower[i]:g}: a diagonal entry of a "
            "relative Cholesky factor (a standard deviation over sigma) cannot be negative. Use its "
            "absolute value."
        )
    if limit is not None and np.any(np.abs(arr) > limit):
        i = int(np.argmax(np.abs(arr)))
        raise InputError(
            f"{label(i)} is {arr[i]:g}; theta is a standard deviation relative to sigma, and start "
            f"values beyond {limit:g} in size leave nothing to estimate. Start near 1 or leave {name} "
            "out."
        )
    return arr


def check_nobs_vs_n_random_effects(n_random: int, n_obs: int, term: str) -> None:
    """lme4's check.nobs.vs.nRE (default "stop"): a term with at least as many random effects as observations
    leaves its variance parameters and the residual's unidentifiable."""
    if n_obs <= n_random:
        raise InputError(
            f"number of observations (={n_obs}) <= number of random effects (={n_random}) for term "
            f"{term}; the random-effects parameters and the residual variance are probably "
            "unidentifiable (lme4 refuses this model too). Remove random slopes from that term, group "
            "by a coarser factor, or collect more observations per level."
        )


def check_fixed_columns_vs_nobs(n_columns: int, n_obs: int, names=()) -> None:
    """At least one observation more than fixed-effect columns (after aliased ones are dropped): with as many
    columns as rows the fixed effects reproduce y exactly, the residual variance is 0 (ML) or 0/0 (REML), and the
    deviance was log(0) (a ZeroDivisionError deep in the engine, or a silent -inf)."""
    if n_columns >= n_obs:
        shown = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
        raise InputError(
            f"the fixed effects have {n_columns} linearly independent column(s) ({shown}) for {n_obs} "
            "observation(s); they fit every observation exactly and leave no residual variance to "
            "estimate. Use fewer fixed-effect terms (a factor with a level per observation, such as "
            "C(x) of a continuous x, is a common cause), or collect more observations."
        )


def check_statsmodels_formulas(formula, re_formula, vc_formula) -> dict:
    """MixedLM.from_formula's formulas: `formula` a string, `re_formula` a string or None, `vc_formula` None or a
    dict of name -> string (a number in vc_formula reached Python's tokenizer as a TypeError). Returns vc_formula
    as a dict sorted by name, as statsmodels orders the components."""
    from .errors import FormulaError

    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string like 'y ~ x'; got {formula!r:.60} ({type(formula).__name__}).")
    if re_formula is not None and not isinstance(re_formula, str):
        raise FormulaError(
            f"re_formula must be a string such as '1' or '1 + x', or None for a random intercept; "
            f"got {re_formula!r:.60} ({type(re_formula).__name__})."
        )
    if vc_formula is None:
        return {}
    if not isinstance(vc_formula, dict):
        raise FormulaError(
            f"vc_formula must be a dict of variance-component names to formulas, such as "
            f"{{'classroom': '0 + C(classroom)'}}; got {type(vc_formula).__name__}."
        )
    for name, f in vc_formula.items():
        if not isinstance(name, str):
            raise FormulaError(
                f"vc_formula's names must be strings (they name the variance components, as "
                f"'{name} Var'); got {name!r} ({type(name).__name__}). Write {{'{name}': ...}}."
            )
        if not isinstance(f, str):
            raise FormulaError(
                f"vc_formula[{name!r}] must be a formula string such as '0 + C({name})'; got "
                f"{f!r:.60} ({type(f).__name__})."
            )
        if not f.strip():
            raise FormulaError(
                f"vc_formula[{name!r}] is empty; give a formula such as '0 + C({name})', or leave the component out."
            )
    return dict(sorted(vc_formula.items()))


# A residual variance below this share of the response's own (about it least-squares fit) is zero to rounding.
ZERO_RESIDUAL_SHARE = 1e-12


def check_residual_variance(sigma2: float, n_obs: int, response_variance: float = 0.0) -> None:
    """A fit whose residual variance is 0 (to rounding: below ZERO_RESIDUAL_SHARE of `response_variance`): the
    fixed and random effects reproduce every observation (more random effects than the data can tell from the
    residual; the deviance falls without bound towards that point, so where an optimizer stops is arbitrary). Its
    standard errors divide by sigma^2 (statsmodels' parametrization is relative to it): a ZeroDivisionError in
    the results before this check."""
    if not sigma2 > ZERO_RESIDUAL_SHARE * response_variance:
        raise InputError(
            f"the fitted model reproduces all {n_obs} observations exactly (residual variance "
            f"{sigma2:g}{', zero to rounding' if sigma2 > 0 else ''}): its fixed and random effects have as "
            "many columns as the data have "
            "observations, so no variance can be estimated. Use fewer random slopes (lme4 refuses "
            "models with as many random effects as observations), group by a coarser factor, or "
            "collect more observations."
        )


def check_groups(groups, n: int) -> np.ndarray:
    """statsmodels' `groups`: one label per row (a constant for crossed designs without a grouping)."""
    if groups is None or np.ndim(groups) == 0:
        raise InputError(
            f"groups must be one label per row (a column name, or an array of length {n}); got "
            f"{groups!r}. For crossed variance components without a grouping, pass a constant "
            "(e.g. groups=np.ones(len(data)))."
        )
    values = np.asarray(groups)
    return values


# -- column types (the data frame every front door takes) ---------------------------------------------------


def check_column_types(data: pd.DataFrame, covariates, groups=(), formulas=(), other=(), column=None) -> pd.DataFrame:
    """The columns a model uses, by role: `covariates` (mentioned in the fixed part or a random-effects
    expression), `groups` (grouping factors only) and `other` (weights, offset). Returns `data`, with pandas'
    nullable booleans as True/False/NaN objects (patsy then reads them as it reads bools, and the rows with NA
    are dropped with the other incomplete rows); raises an InputError naming the column, its dtype and the fix
    for duplicate names and for dtypes that have no single meaning as a covariate. `column(name)`: how to read a
    column (a FrameColumns' column, which keeps what it read)."""
    names = list(dict.fromkeys([*covariates, *groups, *other]))
    dup = [c for c in names if (data.columns == c).sum() > 1] if not data.columns.is_unique else []
    if dup:
        raise InputError(
            f"the data has {len(dup)} name(s) used by the model that label more than one column: "
            f"{', '.join(repr(c) for c in dup)}; a formula cannot tell them apart. Rename them, e.g. "
            "data.columns = [...] or pd.io.common.dedup_names, or drop the duplicates with "
            "data.loc[:, ~data.columns.duplicated()]."
        )
    covariates = set(covariates)
    converted = {}
    for name in names:
        col = data[name] if column is None else column(name)
        dtype = col.dtype
        if (isinstance(dtype, np.dtype) and dtype.kind in "biuf") or type(dtype) is pd.StringDtype:
            continue  # numbers, booleans and pandas' text (pandas 3's `str`): nothing below applies (45 us a column)
        as_covariate = name in covariates and not _only_as_explicit_factor(name, tuple(formulas))
        where = f"column {name!r} (dtype {dtype})"
        if pd.api.types.is_complex_dtype(dtype):
            raise InputError(
                f"{where} holds complex numbers, which a linear mixed model cannot use. Pass the real "
                f"part (data[{name!r}].real), the modulus (abs(data[{name!r}])) or both as separate "
                "real columns."
            )
        if pd.api.types.is_timedelta64_dtype(dtype):
            raise InputError(
                f"{where} holds durations; convert them to a number, e.g. data[{name!r}] = "
                f"data[{name!r}].dt.total_seconds() / 86400 for days."
            )
        if isinstance(dtype, pd.PeriodDtype):
            if as_covariate or name in other:
                raise InputError(
                    f"{where} holds periods; convert them to a number, e.g. periods since the first: "
                    f"data[{name!r}] = (data[{name!r}] - data[{name!r}].min()).apply(lambda d: d.n), "
                    f"or to labels for a factor: data[{name!r}] = data[{name!r}].astype(str)."
                )
        elif pd.api.types.is_datetime64_any_dtype(dtype):
            if as_covariate or name in other:
                raise InputError(
                    f"{where} holds dates, which a formula would read as a factor with a level per date "
                    "(lme4 fits one slope). Convert them to a number, e.g. days since a date: "
                    f"data[{name!r}] = (data[{name!r}] - pd.Timestamp('2020-01-01')).dt.days (or "
                    f".dt.total_seconds() / 86400); or, for one effect per date, write C({name}) in the "
                    "formula."
                )
        elif dtype == object and (name in groups or (name in covariates and not as_covariate)):  # noqa: E721
            check_sortable_labels(col, name, "grouping factor" if name in groups else "factor")
        elif _is_masked_number(dtype) and name not in covariates:
            continue  # a grouping factor only: its codes come from the nullable values, labels as written
        readable = readable_column(col)
        if readable is not None:
            converted[name] = readable
    return data.assign(**converted) if converted else data


def readable_column(col: pd.Series) -> pd.Series | None:
    """The column as the formula reads it, where pandas' dtype is one patsy cannot read (None where it can):
    nullable booleans as True/False/NaN objects; periods and dates with a time zone (a factor, a grouping) as
    their labels. The fit's data and predict's newdata go through this one conversion, so their levels match."""
    dtype = col.dtype
    if isinstance(dtype, pd.PeriodDtype) or getattr(dtype, "tz", None) is not None:
        return col.astype(str).where(col.notna(), np.nan)
    if isinstance(dtype, pd.BooleanDtype):
        return col.astype(object).where(col.notna(), np.nan)
    if _is_masked_number(dtype) and not isinstance(dtype, pd.ArrowDtype):
        # pandas' nullable Int64/Float64: patsy reads them as covariates but not inside C() ("Cannot interpret
        # 'Int64Dtype()' as a data type"). numpy's integers, or floats where there is an NA (NA as NaN).
        if dtype.numpy_dtype.kind in "iu" and not col.isna().any():
            return pd.Series(col.to_numpy(dtype=dtype.numpy_dtype), index=col.index, name=col.name)
        return pd.Series(col.to_numpy(dtype=float, na_value=np.nan), index=col.index, name=col.name)
    if isinstance(dtype, pd.ArrowDtype):
        # Arrow-backed columns (pd.ArrowDtype, read_csv(dtype_backend="pyarrow")): patsy cannot interpret the
        # dtype ("Cannot interpret 'string[pyarrow]' as a data type"). Numbers as numpy's (floats where there is
        # an NA, NA as NaN), text and booleans as Python objects; dates and durations are left to the checks above.
        kind = dtype.numpy_dtype.kind if isinstance(getattr(dtype, "numpy_dtype", None), np.dtype) else "O"
        if kind in "mM":
            return None
        if kind in "iu" and not col.isna().any():
            return pd.Series(col.to_numpy(dtype=dtype.numpy_dtype), index=col.index, name=col.name)
        if kind in "iuf":
            return pd.Series(col.to_numpy(dtype=float, na_value=np.nan), index=col.index, name=col.name)
        return col.astype(object).where(col.notna(), np.nan)
    return None


def readable_columns(data: pd.DataFrame, names) -> pd.DataFrame:
    """`data` with readable_column applied to the `names` it has (predict's newdata)."""
    converted = {}
    for name in dict.fromkeys(names):
        if name in data.columns and isinstance(data[name], pd.Series):
            readable = readable_column(data[name])
            if readable is not None:
                converted[name] = readable
    return data.assign(**converted) if converted else data


def _is_masked_number(dtype) -> bool:
    """pandas' nullable integer and float dtypes (Int64, UInt8, Float64, ...)."""
    return (
        isinstance(dtype, pd.api.extensions.ExtensionDtype)
        and not isinstance(dtype, pd.BooleanDtype)
        and isinstance(getattr(dtype, "numpy_dtype", None), np.dtype)
        and dtype.numpy_dtype.kind in "iuf"
    )


def check_sortable_labels(values: pd.Series, name: str, role: str = "grouping factor") -> None:
    """A factor's labels are sorted into levels (as R's factor): they must be comparable."""
    labels = pd.unique(values.dropna())
    try:
        sorted(labels)
    except TypeError:
        kinds = sorted({type(v).__name__ for v in labels})
        raise InputError(
            f"{role} {name!r} (dtype {values.dtype}) mixes label types that cannot be sorted "
            f"({', '.join(kinds)}); convert the labels to one type, e.g. data[{name!r}] = "
            f"data[{name!r}].astype(str)."
        ) from None


@functools.lru_cache(maxsize=1024)  # a function of the text alone: Python's tokenizer costs ~25 us a formula
def _only_as_explicit_factor(name: str, formulas: tuple) -> bool:
    """Whether every mention of column `name` in the formulas is C(name), factor(name) or the same of Q("name") (an
    explicit factor: FACTOR_FUNCTIONS)."""
    import io
    import tokenize

    seen = False
    for f in formulas:
        if not f:
            continue
        try:
            toks = [
                t.string
                for t in tokenize.generate_tokens(io.StringIO(f).readline)
                if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
            ]
        except (tokenize.TokenError, IndentationError):
            return False
        for i, t in enumerate(toks):
            if t == name or (t[:1] in "'\"" and t.strip("'\"") == name):
                if i >= 2 and toks[i - 2 : i] == ["Q", "("]:
                    before, after = toks[max(i - 4, 0) : i - 2], toks[i + 2 : i + 3]
                    if toks[i + 1 : i + 2] != [")"]:
                        return False
                else:
                    before, after = toks[max(i - 2, 0) : i], toks[i + 1 : i + 2]
                if before not in [[call, "("] for call in FACTOR_FUNCTIONS] or after not in ([")"], [","]):
                    return False
                seen = True
    return seen


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
