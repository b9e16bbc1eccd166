"""R's factor(x) in formulas (`factor(Days)`, as lme4 users write a numeric column read as a factor): patsy's
C(x), so that every rule for an explicit factor (its levels kept for predict, its contrasts) is patsy's own."""

from __future__ import annotations

import patsy.builtins

__all__ = ["factor"]


def factor(x, levels=None):
    """x as a categorical factor: its sorted values as levels, or `levels` in the order given (R's
    factor(x, levels = ...), written factor(x, levels=[...]))."""
    if levels is not None and (isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__")):
        raise ValueError(
            f"factor(x, levels): levels must be the list of the levels in order, such as factor(x, levels=[2, 0, 1]); "
            f"got {levels!r}"
        )
    return patsy.builtins.C(x, levels=levels)
