"""Errors and warnings. Every error is a ValueError subclass whose message names the problem and the fix."""
from __future__ import annotations

__all__ = [
    "SparsemixError", "InputError", "MissingDataError", "RankDeficientError", "FormulaError",
    "SparsemixWarning", "ConvergenceWarning", "SingularFitWarning", "IgnoredArgumentWarning",
]


class SparsemixError(ValueError):
    """Base class of the errors sparsemix raises on purpose."""


class InputError(SparsemixError):
    """The data handed to a model cannot be used as given (shape, type, content)."""


class MissingDataError(InputError):
    """NaN or infinite values where the chosen `missing` policy does not allow them."""


class RankDeficientError(InputError):
    """The fixed-effects design has linearly dependent columns."""


class FormulaError(InputError):
    """A formula (fixed, re_formula or vc_formula) cannot be parsed or evaluated."""


class SparsemixWarning(UserWarning):
    """Base class of sparsemix's warnings."""


class ConvergenceWarning(SparsemixWarning):
    """The optimizer stopped before meeting its convergence criterion."""


class SingularFitWarning(SparsemixWarning):
    """A variance parameter is estimated on the boundary (zero variance or perfect correlation)."""


class IgnoredArgumentWarning(SparsemixWarning):
    """An argument accepted for compatibility has no effect in sparsemix."""
