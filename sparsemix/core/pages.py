"""What the kernel does with a fit's pages: numpy's huge-page hint, off for the length of a fit where the kernel
would stall on it; and the dense routines' buffers, kept for the length of a fit instead of faulted in again.

numpy marks every allocation of 4 MB or more MADV_HUGEPAGE. Where the kernel's transparent huge pages defragment
on demand for such regions (/sys/kernel/mm/transparent_hugepage/defrag `madvise` or `defer+madvise`, the kernel's
default), a page fault in one of them waits for a synchronous compaction whenever no free huge page is at hand
(numpy/numpy#31590). A large fit allocates and frees hundreds of MB of index and value arrays, and on this machine
those faults took a third of its time: the 1,000,000-row slopes design 4.07-4.49 s with the hint, 3.44-3.50 s
without (system time 1.0-1.3 s against 0.4-0.5 s; docs/performance-scale.md). Small fits allocate nothing that
large and are not affected. A user's own NUMPY_MADVISE_HUGEPAGE setting is left as it is.

A freed array of more than glibc's mmap threshold goes back to the kernel, and the next one of that size is faulted
in again, page by page, zeroed: the blocked Cholesky and inverse of a 16,000-column Schur complement allocate ~6 GB
of temporaries an evaluation. Inside `reused_buffers` (a fit) they come from a `Workspace` instead, named buffers
that grow to the largest size asked and are dropped when the scope ends.

glibc's threshold starts at 128 KB and rises, each time an array above it is freed, to that array's size, up to 32
MB (its ceiling on 64-bit; the trim threshold, twice it, follows): in a process's first fit every mid-sized temporary
(the Schur update's products, the pair map's chunks, 0.5-2 MB each) was a fresh mapping, faulted in again after each
rise, where a later fit reuses the freed memory. `keep_freed_memory` sets both thresholds to that ceiling at a
process's first fit: where glibc's own adaptation ends once the process has freed one array of 32 MB, which a large
fit does anyway (InstEval's first fit: 23,000 -> 19,500 page faults, 214 -> 203 ms median of 15 fresh processes;
docs/performance-scale.md). Not where the user set glibc's MALLOC_ variables, or on another C library.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import threading
from contextlib import contextmanager

import numpy as np

__all__ = [
    "compaction_on_fault",
    "without_hugepage_hint",
    "Workspace",
    "reused_buffers",
    "fit_workspace",
    "keep_freed_memory",
]

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


class Workspace:
    """Named buffers handed out as arrays of any shape, dtype and order; a buffer is reused while it is large
    enough (an array from it is valid until the same name is asked for again) and replaced, the old one freed
    first, when it is not."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}
        self._nested: dict[str, Workspace] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype=np.float64, order: str = "C") -> np.ndarray:
        """An uninitialised array from the buffer `name`."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            self._buffers.pop(name, None)
            buffer = self._buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape, order=order)

    def nested(self, name: str) -> "Workspace":
        """A workspace of its own for a routine that calls itself (its names do not meet the caller's)."""
        return self._nested.setdefault(name, Workspace())

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values()) + sum(w.nbytes for w in self._nested.values())


_fit_workspace: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("fit_workspace", default=None)


@contextmanager
def reused_buffers():
    """A Workspace for the dense routines for the length of the outermost such scope (a fit), in this thread."""
    if _fit_workspace.get() is not None:
        yield
        return
    token = _fit_workspace.set(Workspace())
    try:
        yield
    finally:
        _fit_workspace.reset(token)


# glibc's malloc.h: mallopt's parameters, and its adaptive mmap threshold's ceiling on 64-bit (DEFAULT_MMAP_
# THRESHOLD_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_MMAP_THRESHOLD = 32 * 2**20
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """glibc's mmap and trim thresholds at the ceiling of its own adaptation (see the module docstring), once per
    process; whether they were set."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        libc_version = ""
    if not libc_version.startswith("glibc") or any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # (the process's own C library)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * KEPT_MMAP_THRESHOLD)
    )


def fit_workspace() -> Workspace:
    """The fit's Workspace, or a fresh one (whose buffers go with it) outside a fit."""
    return _fit_workspace.get() or Workspace()
