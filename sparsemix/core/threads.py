"""BLAS threads for the engine's stages.

One process here holds several OpenBLAS thread pools: numpy's and scipy's bundled ones (the dense algebra per
evaluation) and the system one that CHOLMOD links. Each defaults to one thread per core, and their threads
spin while waiting (long after a call returns), so when two pools alternate they fight over the cores: the
seed's crossed fit took 0.06 to 0.45 s (median 0.38 s) with default threads and 0.055 s, steadily, with one
thread each; on the 1,000,000-row slopes design numpy's tall products took 33 ms instead of 7 between
Cholesky calls. So a fit runs single-threaded, except

* CHOLMOD's supernodal factorization of a large system (its big fronts are where threads pay), and
* one big dense Cholesky at a time (`dense_threads`): it gets back the threads the caller had, 1.4x faster
  at 1,000 x 1,000 and 1.7x at 4,000 x 4,000 on two cores; and the compiled Schur update into such a
  matrix (`kernel_threads`, numba's own threads: 28.8 s -> 13.6 s on a MovieLens-sized design).

Threads pay only on cores nobody else is using: a thread that waits for a core another process holds stalls the
whole factorization while the others spin (InstEval fits beside one busy process took 3-19 s with two threads,
0.8 s with one). So every multi-threaded stage takes at most the cores free at that moment (`free_cores`: the
cores this process may use less the other tasks running, from /proc/loadavg), and never more threads than the
caller's own setting (threadpoolctl, OPENBLAS_NUM_THREADS).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext

from .pages import keep_freed_memory, reused_buffers, without_hugepage_hint

__all__ = [
    "blas_threads",
    "single_threaded",
    "dense_threads",
    "kernel_threads",
    "blas_libraries",
    "free_cores",
    "own_running_threads",
    "fit_threads",
]

# Up to this many random-effect columns a supernodal system is "small": its fronts are too small for threads.
SINGLE_THREAD_MAX_Q = 50_000
# A dense Cholesky of at least this order is worth the threads (8.4 vs 12.1 ms at 1,000 on two cores) ...
DENSE_THREADS_MIN_ORDER = 1_000
# ... and of at most this order: the OpenBLAS that numpy's and scipy's wheels bundle crashes (segmentation
# fault) in a two-thread Cholesky of order 16,000 here; 14,000 ran (10.7 s) and one thread runs any order.
DENSE_THREADS_MAX_ORDER = 14_000

# numba's threads for the Schur update only from this order on: below it, its thread pool slowed the rest.
KERNEL_THREADS_MIN_ORDER = 4_000

_controller = None
_outer_threads = [1]  # BLAS threads the caller had when the outermost single-threaded scope began
_depth = [0]  # single-threaded scopes open (a whole fit is one; the engine's stages nest inside it)
_raised = [0]  # scopes open that gave BLAS more threads (blas_threads(False), dense_threads)
_outer_setting: list = []  # (library, threads) the outermost one-thread scope changed, put back when the last closes
_lock = threading.Lock()


def single_threaded(q: int, factorization: str | None = None) -> bool:
    """Whether work on a system of q columns runs with one BLAS thread (see the module docstring)."""
    return factorization in ("simplicial", "schur") or q <= SINGLE_THREAD_MAX_Q


def blas_libraries():
    """threadpoolctl's controller of the BLAS libraries in this process, created once. The package creates it
    on import, once CHOLMOD's BLAS is loaded: discovering the libraries reads the path of every shared library
    in the process (11-18 ms with pandas 3's Arrow libraries loaded), which a process's first fit paid."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


class _one_thread:
    """One BLAS thread inside (a class, not a generator: a fit opens ~10 of these scopes, nested, and
    contextmanager's generator was most of each one's cost)."""

    __slots__ = ("_changed",)

    def __enter__(self):
        libs = blas_libraries().lib_controllers
        with _lock:  # fits in several Python threads share these counters (and BLAS's process-wide setting)
            # inside a one-thread scope that no stage has given threads back to, BLAS already runs one thread
            already = _depth[0] > 0 and _raised[0] == 0
            before = [] if already else [lib.num_threads for lib in libs]
            outermost = _depth[0] == 0
            if outermost:  # nested scopes keep the caller's setting, read when the outermost one began
                _outer_threads[0] = max(before, default=1)
            _depth[0] += 1
            # each library set directly: threadpoolctl's limit() (28 us, a small fit's 2%) reads every library's info
            changed = [(lib, n) for lib, n in zip(libs, before) if n != 1]
            # the outermost scope's setting is put back when the last scope closes, whichever thread opened it: a fit
            # in another Python thread may still be running (it then ran on with two threads: its last digits moved)
            self._changed = [] if outermost else changed
            if outermost:
                _outer_setting[:] = changed
            try:
                for lib, _ in changed:
                    _set_threads(lib, 1)
            except BaseException:
                self._close()  # (the outermost's setting with _outer_setting, a nested one's with its own)
                raise
        return self

    def __exit__(self, *exc):
        with _lock:
            self._close()
        return False

    def _close(self):
        """(under _lock) This scope's setting back (one inside a stage given threads), the outermost's with the last."""
        try:
            for lib, n in self._changed:
                _set_threads(lib, n)
        finally:
            _depth[0] -= 1
            if _depth[0] == 0:
                outer, _outer_setting[:] = list(_outer_setting), []
                _outer_threads[0] = 1  # outside any scope the stages run with the threads set now
                for lib, n in outer:
                    _set_threads(lib, n)


def _set_threads(lib, threads: int) -> None:
    """A BLAS library's process-wide thread count set from any Python thread: threadpoolctl 3.8's set_num_threads
    does nothing outside the first thread that called it (a fit in a worker thread ran its LAPACK calls on two
    threads: its last digits differed from the same fit's in the main thread). This module's scopes coordinate the
    threads themselves (_depth, under _lock)."""
    real = getattr(lib, "_real_set_num_threads", None)
    (lib.set_num_threads if real is None else real)(threads)


@contextmanager
def fit_threads():
    """A whole fit (design, optimizer, results) with one BLAS thread: numpy's small and tall products between the
    engine's stages otherwise wake pools whose threads spin on cores that other processes hold (the seed's
    crossed fit beside two busy processes: 72 ms with the default threads, 41 ms with one; quiet: 28 ms). The
    stages that pay for threads take them back, as many as are free (blas_threads(False), dense_threads,
    kernel_threads). numpy's huge-page hint is off meanwhile where the kernel would stall on it, the dense
    routines reuse their buffers, and glibc keeps freed memory from a process's first fit on (core/pages.py)."""
    keep_freed_memory()
    with _one_thread(), without_hugepage_hint(), reused_buffers():
        yield


def free_cores() -> int:
    """The cores this process may use that no other task is running on now: /proc/loadavg's count of running
    tasks less this process's own running threads (its BLAS threads spin for a while after a call: counted as
    others, they took a MovieLens-sized fit's Cholesky down to one thread), against the process's CPU set; all
    of them where that cannot be read."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return cores
    return max(1, min(cores, cores - (running - own_running_threads())))


def own_running_threads() -> int:
    """This process's threads running now (at least the caller), from /proc/self/task."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += state == "R"
    return max(count, 1)


def blas_threads(single: bool):
    """A context limiting every BLAS library to one thread when `single`, else to the cores free now."""
    if single:
        return _one_thread()
    blas = blas_libraries()
    current = max([lib.num_threads for lib in blas.lib_controllers], default=1)
    wanted = min(_outer_threads[0] if _depth[0] else current, free_cores())
    return _raised_to(wanted) if wanted != current else nullcontext()


def dense_threads(order: int, blocked: bool = False):
    """Inside a single-threaded stage: the caller's BLAS threads back (as many as are free) for one dense
    factorization of `order`; `blocked`: a block of a factorization above DENSE_THREADS_MAX_ORDER, which takes all
    of them however busy the machine (such blocks run long enough that a thread sharing a core still adds, where at
    smaller orders it stalls the others: docs/performance-scale.md, tenth session)."""
    if not DENSE_THREADS_MIN_ORDER <= order <= DENSE_THREADS_MAX_ORDER or _outer_threads[0] <= 1:
        return nullcontext()
    threads = _outer_threads[0] if blocked else min(_outer_threads[0], free_cores())
    return _raised_to(threads) if threads > 1 else nullcontext()


@contextmanager
def _raised_to(threads: int):
    """BLAS with `threads` threads inside (a one-thread scope opened in here must set its one thread again)."""
    with _lock:
        _raised[0] += 1
    try:
        with blas_libraries().limit(limits=threads):
            yield
    finally:
        with _lock:
            _raised[0] -= 1


def kernel_threads(order: int, min_order: int = KERNEL_THREADS_MIN_ORDER) -> int:
    """Threads for a compiled update into an order x order matrix: the caller's (as many as are free), from
    `min_order` on (the LMM's Schur update: KERNEL_THREADS_MIN_ORDER); above DENSE_THREADS_MAX_ORDER all of them
    however busy the machine, as the blocked dense work that follows (dense_threads)."""
    if order < min_order:
        return 1
    return _outer_threads[0] if order > DENSE_THREADS_MAX_ORDER else min(_outer_threads[0], free_cores())
