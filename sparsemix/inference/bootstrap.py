"""Parametric bootstrap: simulate from the fitted model, refit, collect (sd, cor, sigma, beta).

Only the response changes between replicates, so each refit reuses the design's cross-products Z'Z, Z'X, X'X
and CHOLMOD's symbolic analysis; Z'y*, X'y*, y*'y* cost one pass over the non-zeros of Z. Replicates run in
worker processes, one per core by default; each replicate draws from its own seed (spawned from `seed`),
so the result does not depend on how replicates are spread over workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ..core.coordinates import system_columns
from ..core.cross_products import assemble_Z
from ..core.system import PenalizedSystem
from ..fit.many import batched_applies, fit_responses
from ..fit.optimize import warm_step
from ..fit.pipeline import optimized_system
from ..fit.stages import optimize_system
from .sdcor import sdcor_of

__all__ = ["parametric_bootstrap", "simulate_responses", "refit_estimates", "glmm_bootstrap"]

_WORKER = {}


def simulate_responses(X, Z, relcov, theta, beta, sigma, weights, rng, nsim) -> np.ndarray:
    """n x nsim responses from the fitted model (new random effects and new noise), without the offset."""
    factors = relcov.factors(theta)
    mean = X @ beta
    out = np.empty((X.shape[0], nsim))
    for s in range(nsim):
        b = relcov.apply(factors, rng.standard_normal(relcov.q))
        noise = rng.standard_normal(X.shape[0])
        if weights is not None:
            noise = noise / np.sqrt(weights)
        out[:, s] = mean + sigma * (Z @ b + noise)
    return out


def refit_estimates(system: PenalizedSystem, theta: np.ndarray, reml: bool) -> np.ndarray:
    """One bootstrap replicate's estimates (sd, cor, sigma, beta) from the system of its simulated response,
    refitted from the fit's theta (BOBYQA's precision: no polish). Shared by the in-memory and Dask doors."""
    # (x || g) as one term where that gives the optimizer derivatives, as in the fit (pipeline.optimized_system)
    target = optimized_system(system)
    opt = optimize_system(target, reml=reml, start_theta=theta, initial_step=warm_step(theta), polish=False)
    sol = system.solution_from(target, opt.theta, reml)
    return np.concatenate([sdcor_of(system.relcov, opt.theta, np.sqrt(sol.sigma2)), sol.beta])


def _init_worker(state, single_threaded=False):
    _WORKER.clear()
    if single_threaded:
        # One process per core: BLAS threads inside each worker (CHOLMOD's OpenBLAS, libgomp) would
        # oversubscribe the cores (on 2 cores, the crossed seed model's 40 refits took 1.35 s with 2 workers
        # and 0.97 s in one process before this limit).
        from threadpoolctl import threadpool_limits

        _WORKER["limits"] = threadpool_limits(1)
    _WORKER.update(state)
    _WORKER["system"] = PenalizedSystem(state["cross"], state["relcov"], diagonal_runs=state["diagonal_runs"])


def _replicates(seed_seqs) -> np.ndarray:
    """The estimates of a chunk of replicates, each simulated from its own seed. Small systems fit the chunk's
    responses together (fit/many.py), the others (and any response those steps leave) one at a time."""
    w = _WORKER
    Y = np.column_stack(
        [
            simulate_responses(
                w["X"],
                w["Z"],
                w["relcov"],
                w["theta"],
                w["beta"],
                w["sigma"],
                w["weights"],
                np.random.default_rng(s),
                1,
            )[:, 0]
            for s in seed_seqs
        ]
    )
    system, relcov, reml = w["system"], w["relcov"], w["reml"]
    out = np.empty((Y.shape[1], relcov.n_theta + 1 + w["X"].shape[1]))
    left = range(Y.shape[1])
    if Y.shape[1] > 1 and batched_applies(system):
        found = fit_responses(
            system, w["cross"].response_sums(w["X"], w["system_Z"], Y, w["weights"]), w["theta"], reml
        )
        for j in np.flatnonzero(found.settled):
            out[j] = np.concatenate([sdcor_of(relcov, found.theta[j], np.sqrt(found.sigma2[j])), found.beta[j]])
        left = np.flatnonzero(~found.settled)
    for j in left:
        # each replicate's system takes over the previous one's factorization (one symbolic analysis per worker)
        w["system"] = w["system"].with_response(w["cross"].with_response(w["X"], w["system_Z"], Y[:, j], w["weights"]))
        out[j] = refit_estimates(w["system"], w["theta"], reml)
    return out


# Replicates simulated and fitted together (fit/many.py): large enough to amortize numpy's per-call costs, small
# enough that the workers share the replicates evenly.
REPLICATES_PER_CHUNK = 250


def parametric_bootstrap(fit, X, terms, weights, nsim=500, seed=None, n_jobs=None) -> np.ndarray:
    """nsim x (n_sdcor + p) array of estimates from data simulated at `fit`'s estimates."""
    relcov = fit.system.relcov
    state = {
        "X": X,
        "Z": assemble_Z(list(terms)),
        "system_Z": system_columns(list(terms), relcov.column_transforms),
        "relcov": relcov,
        "cross": fit.system.cross,
        "diagonal_runs": fit.system.diagonal_runs,
        "theta": fit.theta,
        "beta": fit.beta,
        "sigma": float(np.sqrt(fit.sigma2)),
        "weights": weights,
        "reml": fit.reml,
    }
    seeds = np.random.SeedSequence(seed).spawn(nsim)
    n_jobs = (os.cpu_count() or 1) if n_jobs is None else int(n_jobs)
    size = max(1, min(REPLICATES_PER_CHUNK, -(-nsim // max(n_jobs, 1))))
    chunks = [seeds[i : i + size] for i in range(0, nsim, size)]
    if n_jobs <= 1 or len(chunks) < 2:
        _init_worker(state)
        with fit.system.threads():
            return np.concatenate([_replicates(c) for c in chunks])
    with ProcessPoolExecutor(max_workers=n_jobs, initializer=_init_worker, initargs=(state, True)) as pool:
        return np.concatenate(list(pool.map(_replicates, chunks)))


# -- GLMMs (glmer) --------------------------------------------------------------------------------------------


def _init_glmm_worker(template, nAGQ, single_threaded=False):
    _WORKER.clear()
    if single_threaded:  # one process per core (see _init_worker)
        from threadpoolctl import threadpool_limits

        _WORKER["limits"] = threadpool_limits(1)
    _WORKER.update(template=template, nAGQ=nAGQ)


def _glmm_replicates(Y: np.ndarray) -> np.ndarray:
    """Each column of Y fitted as the template's GLMM (its design, family, weights and offset)."""
    from ..fit.glmm_fit import fit_glmm

    t = _WORKER["template"]
    out = []
    for y in Y.T:
        fit = fit_glmm(t.with_response(y), nAGQ=_WORKER["nAGQ"])
        out.append(np.r_[sdcor_of(t.relcov, fit.theta, 1.0)[:-1], fit.beta])
    return np.array(out).reshape(len(out), -1)


def glmm_bootstrap(template, Y: np.ndarray, nAGQ: int, n_jobs=None) -> np.ndarray:
    """(sd/cor, beta) of GLMM refits of the simulated responses Y (n x nsim), spread over `n_jobs` worker processes
    (all cores by default); `template`: the fitted LaplaceSystem, whose design every replicate shares."""
    n_jobs = (os.cpu_count() or 1) if n_jobs is None else int(n_jobs)
    nsim = Y.shape[1]
    if n_jobs <= 1 or nsim < 2 * n_jobs:
        _init_glmm_worker(template, nAGQ)
        return _glmm_replicates(Y)
    size = max(1, -(-nsim // (4 * n_jobs)))
    chunks = [Y[:, i : i + size] for i in range(0, nsim, size)]
    with ProcessPoolExecutor(
        max_workers=n_jobs, initializer=_init_glmm_worker, initargs=(template, nAGQ, True)
    ) as pool:
        return np.concatenate(list(pool.map(_glmm_replicates, chunks)))
