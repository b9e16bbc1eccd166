"""R's factor(x) in formulas (`factor(Days)`, as lme4 users write a numeric column read as a factor): patsy's
C(x), so that every rule for an explicit factor (its levels kept for predict, its contrasts) is patsy's own; and
R's relevel(f, ref), the factor with another baseline."""

from __future__ import annotations

import numbers

import patsy
import patsy.builtins
from patsy.categorical import CategoricalSniffer, _CategoricalBox

from ..errors import FormulaError

__all__ = ["factor", "relevel"]


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
        del self._sniffer, self._ref

    def transform(self, x, ref):
        levels = x.levels if isinstance(x, _CategoricalBox) else None
        data = x.data if isinstance(x, _CategoricalBox) else x
        return patsy.builtins.C(data, patsy.Treatment(reference=self.reference), levels=levels)


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
