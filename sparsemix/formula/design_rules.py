"""lme4's design rules, shared by the in-memory door (lme4/) and the Dask door (dask/), which evaluate them
on rows and on summed cross-products respectively: column names as R writes them, grouping factors' codes and
labels, the order of the random terms, unique group names, and the aliased fixed-effect columns dropped."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.linalg import lapack

from ..core.cross_products import well_separated_factor
from ..errors import RankDeficiencyWarning, RankDeficientError
from .lme4 import RandomSpec
from .mixedlm import factor_codes, level_name, sorted_codes

__all__ = [
    "TermInfo",
    "lme4_name",
    "group_codes",
    "lme4_term_order",
    "unique_group_names",
    "drop_aliased",
    "unaliased_from_gram",
    "complete_rows",
    "missing_counts",
    "theta_names",
    "level_names",
    "r_name",
    "ALIASED_RELATIVE_NORM",
]

# lme4's rule: a fixed-effect column whose residual on the earlier kept columns, relative to its norm, is below
# this is aliased (a linear combination of them) and dropped.
ALIASED_RELATIVE_NORM = 1e-7


@dataclass(frozen=True)
class TermInfo:
    """What a fitted random-effect term needs to be described and to predict for new data."""

    spec: RandomSpec
    grp: str  # VarCorr's group name (made unique: "Subject", "Subject.1")
    columns: tuple[str, ...]
    levels: tuple  # level labels in code order
    design_info: object = field(repr=False)  # patsy design of the columns, None for a sparse indicator
    indicator: str | None = None  # the factor of a sparse indicator term


def lme4_name(name: str) -> str:
    """patsy's column name as R writes it: (Intercept), powers as R deparses them (`I(age^2)`, which patsy reads
    and names as `I(age ** 2)`), and for Q("my x") the name, in backticks where R needs them (`my x`, `if`;
    yield for Q("yield"))."""
    if name == "Intercept":
        return "(Intercept)"
    name = name.replace(" ** ", "^")
    if 'Q("' not in name:  # (most names: the substitution's regular expression costs ~2 us a column)
        return name
    return re.sub(r'Q\("((?:[^"\\]|\\.)*)"\)', lambda m: r_name(json.loads('"' + m.group(1) + '"')), name)


# R's syntactic names: a letter, or a dot not followed by a digit, then letters, digits, dots and underscores;
# not a reserved word (?Reserved).
_R_SYNTACTIC = re.compile(r"(?:[^\W\d_]|\.(?!\d))[\w.]*")
_R_RESERVED = frozenset(
    "if else repeat while function for in next break TRUE FALSE NULL Inf NaN NA NA_integer_ "
    "NA_real_ NA_character_ NA_complex_ ...".split()
)


def r_name(name: str) -> str:
    syntactic = _R_SYNTACTIC.fullmatch(name) and name not in _R_RESERVED and not re.fullmatch(r"\.\.\d+", name)
    return name if syntactic else "`" + name + "`"


def r_column_order(design_info, desc) -> list[int]:
    """patsy's columns of the fixed design in R's model.matrix order: terms by their number of factors (the
    intercept, main effects, two-way interactions, ...), each as the formula writes them (`desc`: patsy's reading of
    it, terms in the formula's order). patsy puts the terms without numeric factors first (`a + u` gives u's
    columns before a's); lme4 users compare tables in R's order, and lme4 drops aliased columns in it."""
    slices = design_info.term_slices
    terms = [t for t in desc.rhs_termlist if t in slices]
    if len(terms) != len(slices):  # (a term patsy built that the formula's reading lacks: keep patsy's order)
        return list(range(len(design_info.column_names)))
    ordered = sorted(range(len(terms)), key=lambda i: (len(terms[i].factors), i))
    return [j for i in ordered for j in range(slices[terms[i]].start, slices[terms[i]].stop)]


def drop_aliased(X, names) -> tuple[list[int], list[str]]:
    """lme4: (columns kept, names dropped), dropping the fixed-effect columns that are linear combinations of
    earlier ones (Gram-Schmidt on the normalized columns of X), and saying which."""
    norms = np.linalg.norm(X, axis=0)
    if X.shape[1] == 1 and norms[0] > 0:  # (an intercept alone, say)
        return [0], []
    if X.shape[1] and np.all(norms > 0) and X.shape[0] >= X.shape[1]:
        # |R_jj| of X's QR (normalized columns) is column j's residual norm on the columns before it: where every
        # one is clear of the threshold, Gram-Schmidt below would keep every column (one QR: 20 us, not 200). The
        # Cholesky factor of the normalized columns' Gram matrix has the same diagonal, but ~1e-7 off where it is
        # small: it decides first, where every entry is far from the threshold (a product, not a QR of a tall X).
        if well_separated_factor(X.T @ X) is not None:
            return list(range(X.shape[1])), []
        residuals = np.abs(np.diagonal(lapack.dgeqrf(X / norms)[0]))  # (LAPACK's QR as it is: 1 us, numpy's 10)
        if np.all(residuals > 2 * ALIASED_RELATIVE_NORM):
            return list(range(X.shape[1])), []
    keep: list[int] = []
    basis = np.zeros((X.shape[0], 0))
    for j in range(X.shape[1]):
        if norms[j] == 0:
            continue
        col = X[:, j] / norms[j]
        resid = col - basis @ (basis.T @ col) if basis.shape[1] else col
        if np.linalg.norm(resid) > ALIASED_RELATIVE_NORM:
            keep.append(j)
            basis = np.column_stack([basis, resid / np.linalg.norm(resid)])
    return keep, _report_aliased(keep, names)


def unaliased_from_gram(XtX: np.ndarray, names: list[str]):
    """(columns kept, names dropped) by drop_aliased's rule, decided from X'X (the Dask door has no rows): a
    column whose squared residual norm on the kept ones is below ALIASED_RELATIVE_NORM^2 of its own is dropped."""
    keep = []
    for j in range(XtX.shape[0]):
        if XtX[j, j] <= 0:
            continue
        resid = XtX[j, j]
        if keep:
            K = np.array(keep)
            resid -= XtX[j, K] @ np.linalg.solve(XtX[np.ix_(K, K)], XtX[K, j])
        if resid > ALIASED_RELATIVE_NORM**2 * XtX[j, j]:
            keep.append(j)
    dropped = _report_aliased(keep, names)
    if not keep and names:
        raise RankDeficientError("every fixed-effect column is zero in the data.")
    return keep, dropped


def _report_aliased(keep: list[int], names: list[str]) -> list[str]:
    dropped = [names[j] for j in range(len(names)) if j not in keep]
    if dropped:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): {', '.join(dropped)}",
            RankDeficiencyWarning,
            stacklevel=5,
        )  # the door's caller
    return dropped


def theta_names(term_info, terms) -> list[str]:
    """lme4's names of theta's entries ("Subject.(Intercept)", "Subject.Days.(Intercept)"), per term in order."""
    return [
        f"{info.spec.group_name}.{info.columns[i]}"
        if i == j
        else f"{info.spec.group_name}.{info.columns[i]}.{info.columns[j]}"
        for info, term in zip(term_info, terms)
        for i, j in term.template.positions
    ]


def complete_rows(frame: pd.DataFrame, columns, finite=(), column=None) -> np.ndarray:
    """lme4's na.omit (and predict's NaN rows): the rows with a value in every one of `columns` and a finite value
    in every array of `finite` (weights, offset). `column(name)`: how to read a column (FrameColumns.column)."""
    keep = np.ones(len(frame), bool)
    for c in dict.fromkeys(columns):  # a column at a time: frame[columns].notna() built a frame (1 ms on a small model)
        missing = _missing(frame[c] if column is None else column(c))
        if missing is not None:
            keep &= ~missing
    for values in finite:
        keep &= np.isfinite(values)
    return keep


def missing_counts(frame: pd.DataFrame, columns, column=None) -> dict:
    """{column: rows missing} of `columns` with any missing, most first (complete_rows' reading of a value)."""
    counts = {}
    for c in dict.fromkeys(columns):
        missing = _missing(frame[c] if column is None else column(c))
        if missing is not None and missing.any():
            counts[c] = int(missing.sum())
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _missing(col) -> np.ndarray | None:
    """Which rows of a column (a Series, or a frame where a label names several columns) have no value; None where
    none can be missing (integers, booleans)."""
    if isinstance(col, pd.Series) and isinstance(col.dtype, np.dtype) and col.dtype.kind in "biuf":
        # numpy's numbers: NaN is their only missing value (a third of notna's cost)
        return np.isnan(col.to_numpy()) if col.dtype.kind == "f" else None
    if isinstance(col, pd.Series):  # (the array's own isna: a third of the Series')
        return np.asarray(col.array.isna(), dtype=bool)
    return ~col.notna().all(axis=1).to_numpy(dtype=bool)


def lme4_term_order(n_levels: list[int]) -> list[int]:
    """lme4's order of the random terms: most levels first (a stable sort)."""
    return sorted(range(len(n_levels)), key=lambda i: -n_levels[i])


def group_codes(frame: pd.DataFrame, group: tuple[str, ...], check_count=None, columns=None):
    """Integer codes and labels of a grouping factor (an interaction when several variables, levels
    ordered as R's factor(a:b): by a, then b). `check_count(n_levels)` runs before the labels are made, so a
    factor refused for its size costs its codes only. Vectorized: a 10,000,000-level factor took 31 s with
    one Python str() per level."""
    parts, compact = [], len(group) > 1
    for name in group:
        c, levels, categorical = factor_codes(frame[name]) if columns is None else columns.factor_codes(name)
        parts.append((c, levels))
        compact |= categorical  # unused categories: renumber the levels that occur
    if not compact:
        codes, levels = parts[0]
        if check_count is not None:
            check_count(len(levels))
        return codes, tuple(level_names(levels).tolist())
    # One variable at a time, renumbering the combinations that occur after each: the codes stay below
    # rows x levels (the product of all level counts, which np.ravel_multi_index needs, passed 2^63 for
    # (1 | a:b:c:d:e) on five 7,000-level factors).
    codes, first = _renumbered(parts[0][0], len(parts[0][1]))
    which = [first]  # per combination present: each variable's level
    for c, levels in parts[1:]:
        codes, present = _renumbered(codes * len(levels) + c, len(which[0]) * len(levels))
        which = [w[present // len(levels)] for w in which] + [present % len(levels)]
    if check_count is not None:
        check_count(len(which[0]))
    labels = level_names(parts[0][1])[which[0]]
    for (_, levels), idx in zip(parts[1:], which[1:]):
        labels = np.char.add(np.char.add(labels, ":"), level_names(levels)[idx])
    return codes, tuple(labels.tolist())


def _renumbered(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """sorted_codes of integer codes in [0, size): by a mask over the range where it is not much longer than the
    codes (a small model's interaction: 5 us against pandas' 40), else by sorted_codes."""
    if size > 4 * codes.shape[0] + 1024:
        return sorted_codes(codes)
    seen = np.zeros(size, dtype=bool)
    seen[codes] = True
    rank = np.cumsum(seen) - 1
    return rank[codes], np.flatnonzero(seen)


def level_names(levels) -> np.ndarray:
    """level_name of every level, as an array of str (at numpy speed for integer, bool and text levels)."""
    arr = np.asarray(levels)
    if arr.dtype.kind in "iubU":
        return arr.astype(str)
    return np.array([level_name(v) for v in levels], dtype=str)


def unique_group_names(infos):
    """R's make.unique on the group names: the second 'Subject' becomes 'Subject.1'."""
    seen, out = {}, []
    for info in infos:
        n = seen.get(info.grp, 0)
        seen[info.grp] = n + 1
        grp = info.grp if n == 0 else f"{info.grp}.{n}"
        out.append(TermInfo(info.spec, grp, info.columns, info.levels, info.design_info, info.indicator))
    return out
