"""The compiled kernels of small fits (core/kernels.py, numba) as the engine reaches them.

numba compiles a kernel on its first call and keeps it on disk (its cache) for every later process: once per
install, but 5-10 s a kernel, so a new user's first growth-curve fit took 15-23 s. Here a kernel is handed out
where it is compiled already (in this process, or in numba's cache); otherwise the first request starts a process
of its own that compiles every kernel (fit/warmup.py), and until it is done the caller takes its numpy path (the
same optimum in more evaluations: docs/performance-scale.md, twenty-second session).

SPARSEMIX_JIT=now: compile in the calling process on first use instead (numba's own behaviour: the tests, the
warm-up process itself). `sparsemix compile` compiles them in the foreground.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["KERNELS", "kernel", "compiling_here", "EXIT_BUSY"]

# The kernels of small fits, each with a numpy path its callers take while it is not compiled. (The large designs'
# kernels, LevelBands and subtract_gram_lower, compile in their fit: a few seconds there, against slower fallbacks.)
KERNELS = (
    "single_term_deviance_parts",
    "single_term_hessian",
    "many_single_term_hessian",
    "dense_scalar_scoring",
    "level_moments",
)
# numba's cache is looked at again for a kernel not compiled yet at most this often (a fit asks per evaluation)
RECHECK_SECONDS = 0.5
# The warm-up's exit status when another process is compiling already; this process asks again after RETRY_SECONDS
EXIT_BUSY = 3
RETRY_SECONDS = 30.0

_ready: dict = {}  # name -> dispatcher, once usable
_checked: dict = {}  # name -> time numba's cache last lacked it
_here = [False]  # compiling_here's scope open
_compiler: list = [None, 0.0, 0]  # the warm-up process started, when, and by which process (not a fork's parent)


def kernel(name: str):
    """The compiled kernel `name` (one of KERNELS), or None while a separate process compiles it."""
    found = _ready.get(name)
    if found is not None:
        return found
    now = time.monotonic()
    if now - _checked.get(name, -RECHECK_SECONDS) < RECHECK_SECONDS:
        return None
    from . import kernels  # numba: imported (0.3-1 s) by the first fit that needs a kernel

    dispatcher = getattr(kernels, name)
    if _here[0] or os.environ.get("SPARSEMIX_JIT") == "now" or _compiled(dispatcher):
        _ready[name] = dispatcher
        return dispatcher
    if not _compiling():  # no process could be started, or it failed: compiled here, on this call
        _ready[name] = dispatcher
        return dispatcher
    _checked[name] = now
    return None


@contextmanager
def compiling_here():
    """Kernels compiled in this process on first use (the warm-up's fits)."""
    before, _here[0] = _here[0], True
    try:
        yield
    finally:
        _here[0] = before


def _compiled(dispatcher) -> bool:
    """Whether the kernel is compiled in this process, or numba's cache on disk holds it for this machine (its index,
    as numba's loader reads it: not stale against the source file, compiled for this CPU). Where numba's internals
    are not as expected: True (the call then compiles it, as numba alone would)."""
    if dispatcher.signatures:
        return True
    try:
        magic = dispatcher.targetctx.codegen().magic_tuple()
        return any(key[1] == magic for key in dispatcher._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001 (numba's private API moved: its own behaviour, not a failed fit)
        return True


def _compiling() -> bool:
    """Whether a warm-up process is compiling the kernels, started here if none is: False where it could not be
    started or ended without compiling them (the caller then compiles in this process)."""
    process, started, parent = _compiler
    if process is not None and parent == os.getpid():
        status = process.poll()
        if status is None:
            return True  # running (its kernels are read from the cache as they are written)
        if status != EXIT_BUSY:
            return False  # done, and the kernel asked for is not in the cache (not writable?), or failed
        if time.monotonic() - started < RETRY_SECONDS:
            return True  # another process compiles them
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sparsemix.fit.warmup"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not the caller's terminal's signals (Ctrl-C)
            env={**os.environ, "SPARSEMIX_JIT": "now"},
        )
    except (OSError, ValueError):
        return False
    threading.Thread(target=process.wait, daemon=True).start()  # reaped when it ends (no zombie left)
    _compiler[:] = [process, time.monotonic(), os.getpid()]
    return True
