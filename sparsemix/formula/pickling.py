"""Pickling of fitted results: statsmodels' results pickle, and ours must too.

Two things in a fit refuse pickle: CHOLMOD's factor (PenalizedSystem drops it and rebuilds it on first use) and
patsy's formula objects (DesignInfo, EvalFactor, EvalEnvironment, stateful transforms such as center()), whose
classes raise NotImplementedError on purpose. predict needs those objects exactly as fitted (the levels and
contrasts of each factor, the state of each transform), so they are not re-derived: a results object pickles
its attributes with a pickler that writes patsy's objects as their class and attributes, the formula
functions sparsemix provides by name, and modules by name (`PicklableResults`). Everything else pickles as
usual, so a function of the caller's that a formula calls must be importable where the results are loaded, as
pickle requires of any function.
"""

from __future__ import annotations

import importlib
import io
import pickle
import types

__all__ = ["PicklableResults"]


class PicklableResults:
    """Mixin: pickle the instance through `_Pickler` (patsy's objects included), as one blob."""

    def __reduce_ex__(self, protocol):
        return _loads, (_dumps(self, protocol),)


def _loads(blob: bytes):
    return pickle.loads(blob)


def _new(cls):
    return cls.__new__(cls)


def _safe_function(name: str):
    from .safety import SAFE_FUNCTIONS, safe_environment

    if name in SAFE_FUNCTIONS:
        return SAFE_FUNCTIONS[name]
    return safe_environment().namespace[name]  # the pinned names: Q, np, numpy


def _named_functions() -> dict[int, str]:
    """id -> name of the functions and namespaces that sparsemix's formula environment provides: several are
    closures (patsy's stateful transforms) or namespaces that pickle cannot find by module and name."""
    from .safety import SAFE_FUNCTIONS, safe_environment

    pinned = safe_environment()._namespaces[0]
    return {id(v): k for k, v in {**SAFE_FUNCTIONS, **pinned}.items()}


class _Pickler(pickle.Pickler):
    def __init__(self, file, protocol):
        super().__init__(file, protocol)
        self._named = _named_functions()

    def reducer_override(self, obj):
        cls = type(obj)
        if cls is type or isinstance(obj, type):
            return NotImplemented  # classes pickle by reference
        name = self._named.get(id(obj))
        if name is not None:
            return _safe_function, (name,)
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if cls.__module__.split(".")[0] == "patsy" and hasattr(obj, "__dict__"):  # patsy refuses by design
            return _new, (cls,), obj.__dict__
        if isinstance(obj, PicklableResults):  # one blob, not a blob inside a blob
            return _new, (cls,), obj.__dict__
        return NotImplemented


def _dumps(state, protocol) -> bytes:
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, min(protocol, pickle.HIGHEST_PROTOCOL)).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise pickle.PicklingError(
            f"these results cannot be pickled: {exc}. A function that the formula calls is kept with the fit "
            "to predict; it must be defined at the top level of a module (not a lambda or a nested function) "
            "for pickle to store it by name."
        ) from exc
    return buffer.getvalue()
