"""R's vector functions that lme4 users write in formulas: ifelse(), pmin(), pmax(), c(), and %in% (read as
isin(x, values): formula/lme4.py rewrites `x %in% c(...)`)."""

from __future__ import annotations

import numpy as np

from ..errors import FormulaError

__all__ = ["ifelse", "pmin", "pmax", "c", "isin", "numeric_values"]


def ifelse(test, yes, no):
    """R's ifelse(test, yes, no): `yes` where test holds, `no` elsewhere (each a value or a column)."""
    return np.where(np.asarray(test, dtype=bool), yes, no)


def pmin(*values):
    """R's pmin(x, y, ...): the smallest of the values, row by row."""
    return np.minimum.reduce(np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in values)))


def pmax(*values):
    """R's pmax(x, y, ...): the largest of the values, row by row."""
    return np.maximum.reduce(np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in values)))


def c(*values):
    """R's c(...): the values as one array (knots = c(3, 6); x %in% c("a", "b"))."""
    return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values]) if values else np.array([])


def isin(x, values):
    """R's x %in% values: whether each value of x is one of `values`."""
    return np.isin(np.asarray(x), np.atleast_1d(np.asarray(values)))


def numeric_values(x, name: str) -> np.ndarray:
    """One numeric column's values as floats, for the formula function `name` (splines, cut): a FormulaError saying
    so for text or for more than one column."""
    try:
        values = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise FormulaError(f"{name}() takes a numeric column; got values of type {np.asarray(x).dtype}.") from None
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise FormulaError(f"{name}() takes one numeric column; got an array of shape {values.shape}.")
    return values
