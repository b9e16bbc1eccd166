"""The compiled kernels of small fits (core/compiled.py's KERNELS) compiled ahead of the fits that need them, by
small fits that call each of them: in a process of its own, which core/compiled.py starts on the first request
(`python -m sparsemix.fit.warmup`), or in the foreground (`sparsemix compile`). numba keeps them in its cache on
disk for every later process."""

from __future__ import annotations

import os
import sys

import numpy as np

from ..core.compiled import EXIT_BUSY, compiling_here
from ..core.terms import CovarianceTemplate, RandomTerm
from .many import fit_responses
from .pipeline import fit_lmm

__all__ = ["compile_kernels"]


def compile_kernels() -> None:
    """Fit a growth curve (one correlated 2 x 2 term: single_term_deviance_parts, single_term_hessian; its response
    again as lmer_many fits many: many_single_term_hessian) and crossed
    random intercepts held dense and scored (dense_scalar_scoring), compiling each kernel in this process."""
    rng = np.random.default_rng(0)
    with compiling_here():
        groups, times = 12, 5
        g = np.repeat(np.arange(groups), times)
        t = np.tile(np.arange(times, dtype=float), groups)
        y = 1.0 + 0.5 * t + rng.normal(size=groups)[g] + 0.3 * rng.normal(size=groups)[g] * t + rng.normal(size=g.size)
        X = np.column_stack([np.ones_like(t), t])
        slopes = RandomTerm.from_codes(
            "g", g, X, groups, CovarianceTemplate.unstructured(2), np.arange(groups), ("(Intercept)", "t")
        )
        fit = fit_lmm(X, y, [slopes])
        cross = fit.system.cross  # its response as many (lmer_many's batched steps: many_single_term_hessian)
        sums = (cross.Zty[:, None], cross.Xty[:, None], np.array([cross.yty]), cross.beta_ols[:, None])
        fit_responses(fit.system, sums, fit.theta, fit.reml)
        rows, cols = 200, 30
        a, b = np.divmod(np.arange(rows * cols), cols)
        kept = rng.random(a.size) < 0.2  # unbalanced: points are scored (balanced, the moments are the optimum)
        a, b = a[kept], b[kept]
        x = rng.normal(size=a.size)
        y = rng.normal(size=rows)[a] + rng.normal(size=cols)[b] + x + rng.normal(size=a.size)
        ones = np.ones((a.size, 1))
        terms = [
            RandomTerm.from_codes(name, codes, ones, n, CovarianceTemplate.unstructured(1), np.arange(n), ("1",))
            for name, codes, n in (("a", a, rows), ("b", b, cols))
        ]
        fit_lmm(np.column_stack([ones[:, 0], x]), y, terms)


def _main() -> int:
    """The background compile: one at a time (a lock file beside the others' in the temporary directory; the
    others exit with EXIT_BUSY), at a low priority."""
    import tempfile

    lock = open(os.path.join(tempfile.gettempdir(), f"sparsemix-compile-{os.getuid()}.lock"), "w")  # noqa: SIM115
    try:
        import fcntl
    except ImportError:  # (not POSIX: no lock)
        pass
    else:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return EXIT_BUSY
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
    compile_kernels()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
