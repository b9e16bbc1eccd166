"""R's factor(x) in formulas (`factor(Days)`, as lme4 users write a numeric column read as a factor): patsy's
C(x), so that every rule for an explicit factor (its levels kept for predict, its contrasts) is patsy's own; and
R's relevel(f, ref), the factor with another baseline, and cut(x, breaks), a number's intervals as a factor."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import patsy
import patsy.builtins
from patsy.categorical import CategoricalSniffer, _CategoricalBox

from ..errors import FormulaError
from .vectors import numeric_values

__all__ = ["factor", "relevel", "cut"]


def factor(x, levels=None):
    """x as a categorical factor: its sorted values as levels, or `levels` in the order given (R's
    factor(x, levels = ...), written factor(x, levels=[...]))."""
    if levels is not None and (isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__")):
        raise ValueError(
            f"factor(x, levels): levels must be the list of the levels in order, such as factor(x, levels=[2, 0, 1]); "
            f"got {levels!r}"
        )
    return patsy.builtins.C(x, levels=levels)


class _Relevel:
    """relevel(f, ref): f's levels with `ref` first, the baseline of its treatment contrasts (the other levels keep
    their order), as R's relevel. `ref` names a level (as R writes it: "10" for factor(age)'s 10) or, a whole
    number, its position among the levels (1 the first), as in R; resolved once, on the data the model is fitted
    to (a stateful transform), so that new data with fewer levels keeps the fitted baseline."""

    def __init__(self):
        self._sniffer = CategoricalSniffer(patsy.NAAction())

    def memorize_chunk(self, x, ref):
        self._sniffer.sniff(x)
        self._ref = ref

    def memorize_finish(self):
        levels, _ = self._sniffer.levels_contrast()
        self.reference = _reference_level(tuple(levels), self._ref)
        # R's relevel itself: the levels reordered, the reference first (treatment contrasts' baseline, the others'
        # columns in their order), as a bare Categorical: patsy reads its codes, where a C() box of the values with
        # Treatment(reference) went value by value (72 of 89 ms on MathAchieve's 7,185 rows)
        self.levels = [self.reference] + [level for level in levels if level != self.reference]
        del self._sniffer, self._ref

    def transform(self, x, ref):
        data = x.data if isinstance(x, _CategoricalBox) else x
        return pd.Categorical(np.asarray(data, dtype=object), categories=self.levels)


def _reference_level(levels: tuple, ref):
    if isinstance(ref, numbers.Integral) and not isinstance(ref, bool):  # R: a position among the levels
        if not 1 <= ref <= len(levels):
            raise FormulaError(
                f"relevel(f, ref = {ref}): a number is a position among f's {len(levels)} levels, 1 to {len(levels)}."
            )
        return levels[ref - 1]
    for level in levels:
        if level == ref or str(level) == str(ref):  # ("10" for the level 10, as R's factor levels are text)
            return level
    shown = ", ".join(repr(str(v)) for v in levels[:10]) + (", ..." if len(levels) > 10 else "")
    raise FormulaError(f"relevel(f, ref = {ref!r}): {ref!r} is not a level of f; its levels are {shown}.")


relevel = patsy.stateful_transform(_Relevel)


class _Cut:
    """R's cut(x, breaks): x's values as a factor of intervals, in the intervals' order, named as R names them
    ("(3,6]"). `breaks` is a number of intervals (equal widths over the fitted data's range, widened by a thousandth
    of it at both ends, as R does; kept for new data) or the interval bounds; `right` closes the intervals on the
    right, `include_lowest` (R's include.lowest) the first one on the left as well."""

    def __init__(self):
        self._chunks: list = []

    def memorize_chunk(self, x, breaks, labels=None, include_lowest=False, right=True, dig_lab=3):
        self._chunks.append(numeric_values(x, "cut"))
        self._given = (breaks, labels, bool(include_lowest), bool(right), int(dig_lab))

    def memorize_finish(self):
        breaks, labels, include_lowest, right, digits = self._given
        self.bounds = _cut_bounds(np.concatenate(self._chunks), breaks)
        self.levels = _cut_labels(self.bounds, labels, include_lowest, right, digits)
        del self._chunks, self._given

    def transform(self, x, breaks, labels=None, include_lowest=False, right=True, dig_lab=3):
        values = numeric_values(x, "cut")
        bounds = self.bounds
        side = "left" if right else "right"
        code = np.searchsorted(bounds, values, side=side) - 1  # the interval (b_i, b_i+1] (right) or [b_i, b_i+1)
        if include_lowest:
            code[values == (bounds[0] if right else bounds[-1])] = 0 if right else bounds.size - 2
        outside = (code < 0) | (code > bounds.size - 2)
        if np.any(outside & ~np.isnan(values)):
            found = values[outside & ~np.isnan(values)]
            which = f"{found[0]} lies" if found.size == 1 else f"{found[0]} (and {found.size - 1} more) lie"
            raise FormulaError(
                f"cut(): {which} outside the breaks {bounds.tolist()}, where R gives NA; widen the breaks (-Inf and "
                "Inf as the outer ones) or drop those rows"
            )
        # a Categorical of the codes, its categories the intervals in order, not boxed by C(): patsy reads a bare
        # Categorical's codes, and anything boxed value by value (76 of 94 ms on MathAchieve's 7,185 rows)
        return pd.Categorical.from_codes(np.clip(code, 0, bounds.size - 2), categories=self.levels)


def _cut_bounds(x: np.ndarray, breaks) -> np.ndarray:
    breaks = np.atleast_1d(np.asarray(breaks, dtype=float))
    if breaks.size == 1:  # a number of intervals: R's equal widths, the range widened by a thousandth of itself
        count = breaks[0]
        if not (np.isfinite(count) and count >= 2 and float(count).is_integer()):
            raise FormulaError(f"cut(x, breaks): a number of intervals must be a whole number, 2 or more; got {count}.")
        low, high = float(np.nanmin(x)), float(np.nanmax(x))
        width = high - low
        if width == 0:
            width = abs(low) if low != 0 else 1.0
            return np.linspace(low - width / 1000, high + width / 1000, int(count) + 1)
        bounds = np.linspace(low, high, int(count) + 1)
        bounds[[0, -1]] = low - width / 1000, high + width / 1000
        return bounds
    bounds = np.sort(breaks)
    if np.any(np.isnan(bounds)) or np.any(np.diff(bounds) == 0):
        raise FormulaError(f"cut(x, breaks): the breaks must be distinct numbers; got {breaks.tolist()}.")
    return bounds


def _cut_labels(bounds, labels, include_lowest, right, digits) -> tuple:
    if labels is not None:
        labels = [str(v) for v in np.atleast_1d(np.asarray(labels, dtype=object))]
        if len(labels) != bounds.size - 1 or len(set(labels)) != len(labels):
            raise FormulaError(
                f"cut(x, breaks, labels): {bounds.size - 1} distinct labels are needed, one an interval; got {labels}."
            )
        return tuple(labels)
    for dig in range(digits, max(12, digits) + 1):  # R: more digits until neighbouring bounds read differently
        text = [_r_number(b, dig) for b in bounds]
        if all(a != b for a, b in zip(text[:-1], text[1:])):
            break
    opening, closing = ("(", "]") if right else ("[", ")")
    out = [f"{opening}{a},{b}{closing}" for a, b in zip(text[:-1], text[1:])]
    if include_lowest:
        out[0 if right else -1] = ("[" + out[0][1:]) if right else (out[-1][:-1] + "]")
    return tuple(out)


def _r_number(value: float, digits: int) -> str:
    """R's formatC(value, digits, width = 1): C's %g, Inf as R writes it in cut's labels."""
    if np.isinf(value):
        return "-Inf" if value < 0 else " Inf"
    return f"{value:.{digits}g}"


cut = patsy.stateful_transform(_Cut)
