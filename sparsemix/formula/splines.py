"""R's splines::bs() and splines::ns() in formulas, as patsy stateful transforms: the knots come from the data
the model is fitted to and are kept for new data (predict), which past the boundary knots is extrapolated as R
does it (bs: the Taylor polynomial of the basis at the boundary; ns: linearly). The columns are R's, so that
coefficients compare with lme4's one by one (tests/reference/r_functions_fixtures.R)."""

from __future__ import annotations

import numpy as np
import patsy

from ..errors import FormulaError
from .vectors import numeric_values

__all__ = ["bs", "ns"]


class _Spline:
    """Knots and boundary from the fitted data; the basis of any x from them."""

    natural = False

    def __init__(self):
        self._chunks: list | None = []
        self._given: dict | None = None

    def memorize_chunk(self, x, *args, **kwargs):
        self._given = self._options(*args, **kwargs)
        self._chunks.append(numeric_values(x, self.name))

    def memorize_finish(self):
        self._settle(np.concatenate(self._chunks), self._given)
        self._chunks = None

    def transform(self, x, *args, **kwargs):
        if self._options(*args, **kwargs) != self._given:
            raise FormulaError(f"{self.name}(): its arguments must not change between fitting and prediction.")
        return self._basis(numeric_values(x, self.name))

    def _settle(self, x, options):
        if x.size == 0:
            raise FormulaError(f"{self.name}(): no values to place the knots by.")
        boundary = options["boundary"]
        lower, upper = (float(np.min(x)), float(np.max(x))) if boundary is None else sorted(map(float, boundary))
        knots = options["knots"]
        if knots is None:
            least = self._columns_without_knots(options)
            interior = options["df"] - least
            if interior < 0:
                raise FormulaError(
                    f"{self.name}(): df={options['df']} is fewer columns than it has without interior knots; give "
                    f"df of at least {least}, or the knots."
                )
            inside = x[(x >= lower) & (x <= upper)]
            distinct = np.unique(inside).size
            if interior > max(distinct - 2, 0):  # (knots strictly between the boundary's, at distinct quantiles)
                raise FormulaError(
                    f"{self.name}(): df={options['df']} asks for {interior} interior knots, but x has {distinct} "
                    f"distinct values; give df of at most {least + max(distinct - 2, 0)}."
                )
            # R's quantile (type 7, numpy's default) at equally spaced probabilities
            knots = np.quantile(inside, np.linspace(0, 1, interior + 2)[1:-1]) if interior else np.array([])
        knots = np.sort(np.asarray(knots, dtype=float).ravel())
        if not lower < upper:
            raise FormulaError(f"{self.name}(): the boundary knots must differ; the data span only {lower}.")
        if knots.size and (knots.min() <= lower or knots.max() >= upper):
            raise FormulaError(f"{self.name}(): the knots must lie inside the boundary knots ({lower}, {upper}).")
        from scipy.interpolate import BSpline  # (scipy.interpolate loads scipy.optimize: only where a spline is used)

        self.degree = options["degree"]
        self.intercept = options["intercept"]
        self.lower, self.upper = lower, upper
        order = self.degree + 1
        self.knots = np.concatenate([np.repeat(lower, order), knots, np.repeat(upper, order)])
        self._spline = BSpline(self.knots, np.eye(self.knots.size - order), self.degree, extrapolate=False)
        if self.natural:
            const = self._spline.derivative(2)(np.array([lower, upper]))  # second derivatives at the boundary
            if not self.intercept:
                const = const[:, 1:]
            # R: the basis times the complement of const's span, from its Householder QR (LAPACK's reflectors are
            # LINPACK's: the same Q)
            q, _ = np.linalg.qr(const.T, mode="complete")
            self._null = q[:, 2:]

    def _basis(self, x):
        inside = (x >= self.lower) & (x <= self.upper)
        basis = np.empty((x.size, self._spline.c.shape[1]))
        basis[inside] = self._spline(x[inside])
        for edge, outside in ((self.lower, x < self.lower), (self.upper, x > self.upper)):
            if outside.any():
                basis[outside] = self._beyond(x[outside] - edge, edge)
        basis[np.isnan(x)] = np.nan
        if not self.intercept:
            basis = basis[:, 1:]
        return basis @ self._null if self.natural else basis

    def _beyond(self, offset, edge):
        """The basis past a boundary knot: its Taylor polynomial there, to the degree's term (bs) or the linear one
        (ns), as R's splines extrapolate."""
        degree = 1 if self.natural else self.degree
        out = np.zeros((offset.size, self._spline.c.shape[1]))
        factorial = 1.0
        for d in range(degree + 1):
            factorial *= max(d, 1)
            derivative = self._spline.derivative(d)(np.array([edge])) if d else self._spline(np.array([edge]))
            out += np.outer(offset**d / factorial, derivative[0])
        return out


class _BS(_Spline):
    name = "bs"

    @staticmethod
    def _options(df=None, knots=None, degree=3, intercept=False, Boundary_knots=None):
        return _checked("bs", df, knots, degree, intercept, Boundary_knots)

    @staticmethod
    def _columns_without_knots(options):
        return options["degree"] + int(options["intercept"])


class _NS(_Spline):
    name = "ns"
    natural = True

    @staticmethod
    def _options(df=None, knots=None, intercept=False, Boundary_knots=None):
        return _checked("ns", df, knots, 3, intercept, Boundary_knots)

    @staticmethod
    def _columns_without_knots(options):
        return 1 + int(options["intercept"])


def _checked(name, df, knots, degree, intercept, boundary) -> dict:
    if df is None and knots is None:
        raise FormulaError(f"{name}(): give df (the number of columns) or knots, as {name}(x, df = 3).")
    if df is not None and (isinstance(df, bool) or not float(df).is_integer() or df < 1):
        raise FormulaError(f"{name}(): df must be a whole number of columns, 1 or more; got {df!r}.")
    if isinstance(degree, bool) or not float(degree).is_integer() or degree < 1:
        raise FormulaError(f"{name}(): degree must be a whole number, 1 or more; got {degree!r}.")
    if knots is not None:
        knots = tuple(np.atleast_1d(np.asarray(knots, dtype=float)).tolist())
        if not all(np.isfinite(knots)):
            raise FormulaError(f"{name}(): the knots must be finite numbers; got {list(knots)}.")
    if boundary is not None:
        boundary = tuple(np.asarray(boundary, dtype=float).ravel().tolist())
        if len(boundary) != 2 or not all(np.isfinite(boundary)):
            raise FormulaError(f"{name}(): Boundary_knots must be two finite numbers; got {list(boundary)}.")
    return {
        "df": None if df is None else int(df),
        "knots": knots,
        "degree": int(degree),
        "intercept": bool(intercept),
        "boundary": boundary,
    }


bs = patsy.stateful_transform(_BS)
ns = patsy.stateful_transform(_NS)
