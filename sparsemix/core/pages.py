"""numpy's huge-page hint, off for the length of a fit where the kernel would stall on it.

numpy marks every allocation of 4 MB or more MADV_HUGEPAGE. Where the kernel's transparent huge pages defragment
on demand for such regions (/sys/kernel/mm/transparent_hugepage/defrag `madvise` or `defer+madvise`, the kernel's
default), a page fault in one of them waits for a synchronous compaction whenever no free huge page is at hand
(numpy/numpy#31590). A large fit allocates and frees hundreds of MB of index and value arrays, and on this machine
those faults took a third of its time: the 1,000,000-row slopes design 4.07-4.49 s with the hint, 3.44-3.50 s
without (system time 1.0-1.3 s against 0.4-0.5 s; docs/performance-scale.md). Small fits allocate nothing that
large and are not affected. A user's own NUMPY_MADVISE_HUGEPAGE setting is left as it is.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager

import numpy as np

__all__ = ["compaction_on_fault", "without_hugepage_hint"]

DEFRAG_SETTING = "/sys/kernel/mm/transparent_hugepage/defrag"

_lock = threading.Lock()
_depth = [0]  # fits open (in any thread): the hint is restored when the last one ends
_previous = [True]


def compaction_on_fault(setting: str | None = None) -> bool:
    """Whether a fault in a MADV_HUGEPAGE region may wait for memory compaction: the defrag setting (its bracketed
    choice; read from DEFRAG_SETTING where not given) is `madvise` or `defer+madvise`."""
    if setting is None:
        try:
            with open(DEFRAG_SETTING) as f:
                setting = f.read()
        except OSError:
            return False
    start, end = setting.find("["), setting.find("]")
    chosen = setting[start + 1 : end] if 0 <= start < end else setting.strip()
    return chosen in ("madvise", "defer+madvise")


@functools.lru_cache(maxsize=1)
def _hint_setter():
    """numpy's (private) switch of the hint, where it is to be used: None where the user set NUMPY_MADVISE_HUGEPAGE,
    the kernel does not stall on the hint, or this numpy has no such switch."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ or not compaction_on_fault():
        return None
    for module in ("_core", "core"):  # numpy 2, numpy 1
        setter = getattr(getattr(np, module, None), "multiarray", None)
        setter = getattr(setter, "_set_madvise_hugepage", None)
        if setter is not None:
            return setter
    return None


@contextmanager
def without_hugepage_hint():
    """numpy's huge-page hint off inside (see the module docstring); as it was after the outermost such scope."""
    setter = _hint_setter()
    if setter is None:
        yield
        return
    with _lock:
        if _depth[0] == 0:
            _previous[0] = bool(setter(False))
        _depth[0] += 1
    try:
        yield
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                setter(_previous[0])
