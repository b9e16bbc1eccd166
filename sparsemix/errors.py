"""Errors and warnings. Every error is a ValueError subclass whose message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "SparsemixError",
    "InputError",
    "MissingDataError",
    "RankDeficientError",
    "FormulaError",
    "SparsemixWarning",
    "ConvergenceWarning",
    "SingularFitWarning",
    "IgnoredArgumentWarning",
    "NewLevelWarning",
    "RankDeficiencyWarning",
    "MissingExtraError",
    "require_extra",
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


class NewLevelWarning(SparsemixWarning):
    """Rows of predict's newdata have a level of a grouping factor the fit did not see: population-level."""


class RankDeficiencyWarning(SparsemixWarning):
    """Fixed-effect columns were dropped because they are linear combinations of the others (as lme4)."""


class DroppedRowsWarning(SparsemixWarning):
    """Most of the data's rows were dropped for missing values (lme4's na.omit) before the fit."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require_extra(module: str, extra: str, purpose: str):
    """Import an optional module, or raise MissingExtraError naming `pip install 'sparsemix[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed; install it with "
            f"pip install 'sparsemix[{extra}]'"
        ) from None
