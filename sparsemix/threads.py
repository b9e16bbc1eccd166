"""BLAS threads for the engine's stages.

One process here holds two OpenBLAS thread pools: numpy's and scipy's bundled one (the small dense algebra
per evaluation) and the system one that CHOLMOD links. Both default to one thread per core, and their threads
spin while waiting (long after a call returns), so on small systems they fight over the cores: the seed's
crossed fit took 0.06 to 0.45 s (median 0.38 s) with default threads and 0.055 s, steadily, with one thread
each. Threads pay only for large dense work (supernodal factorizations with big fronts), so the whole fit of a
small system, from the cross-products on, runs single-threaded.
"""
from __future__ import annotations

from contextlib import nullcontext

__all__ = ["blas_threads", "single_threaded"]

# Up to this many random-effect columns a system is "small": its dense pieces are too small for threads to pay.
SINGLE_THREAD_MAX_Q = 50_000

_controller = None


def single_threaded(q: int) -> bool:
    return q <= SINGLE_THREAD_MAX_Q


def blas_threads(single: bool):
    """A context limiting every BLAS library to one thread when `single`, else leaving them as they are."""
    global _controller
    if not single:
        return nullcontext()
    if _controller is None:
        from threadpoolctl import ThreadpoolController   # created once: discovering the libraries costs 2 ms
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")
