"""Profiled deviance of a linear mixed model over one sparse Cholesky factor (Bates et al. 2015, lme4).

    L L' = P (Lambda' Z'Z Lambda + I) P'
    R_ZX = L^{-1} P Lambda' Z'X,        c_u = L^{-1} P Lambda' Z'y
    R_X' R_X = X'X - R_ZX' R_ZX,         c_beta = R_X^{-T} (X'y - R_ZX' c_u)
    r^2 = y'y - |c_u|^2 - |c_beta|^2     (penalized residual sum of squares)

The sparsity pattern of Lambda' Z'Z Lambda does not depend on theta, so CHOLMOD analyses it once (fill-
reducing permutation, supernodal structure) and each evaluation only recomputes values and refactors in
place. The values are recomputed block by block: for terms t, s and levels a, b the block is
T_t' (Z'Z)_{ab} T_s, with (Z'Z)_{ab} the dense k_t x k_s block of the cross-products.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from scipy.linalg import lapack
from sksparse.cholmod import CholmodNotPositiveDefiniteError

from ..errors import RankDeficientError
from .cross_products import CrossProducts
from .factor import CholmodFactor, DenseFactor, SchurFactor, schur_applicable, trailing_rescaled, unique_inverse
from .gradient import ProfiledGradient, SchurGradient
from .relcov import RelativeCovariance
from .threads import blas_threads, single_threaded

__all__ = ["PenalizedSystem", "Evaluation", "Solution"]

LOG_2PI = float(np.log(2 * np.pi))
# Up to this many stored entries in A, a trial factorization in each CHOLMOD mode costs milliseconds.
TRIAL_FACTORIZATION_MAX_NNZ = 2_000_000
# Patterns whose measured factorization mode is remembered for the process (the oldest dropped first).
CHOSEN_MODES_KEPT = 256
_CHOSEN_MODES: dict[tuple, str] = {}
# A simplicial factorization this fast is not worth a supernodal trial (whose first call costs more).
FAST_FACTORIZATION_SECONDS = 0.002
# A rate for dense LAPACK Cholesky, used to skip hopeless trials of the Schur form (one core measured 31e9:
# a 1,156 x 1,156 factor in 16.5 ms; a slower machine only makes the trial a little wasted work).
DENSE_FLOPS_PER_SECOND = 2e10
# The Schur form holds up to two dense q2 x q2 matrices: at most this share of the machine's memory (on 24 GB,
# q2 up to 22,000; a MovieLens-sized design has 16,000). A scored point (fit/scoring.py) holds the factor, the
# inverse and its blocks' temporaries: about 1.4 times that, under half the memory.
SCHUR_MEMORY_FRACTION = 1 / 3
# From this order of the block after the first term, a block whose elimination pattern is at least this full goes
# to the Schur form untimed (engine._schur_alone).
SCHUR_ALONE_MIN_ORDER = 100
SCHUR_ALONE_MIN_DENSITY = 0.1
# ... or where that elimination links each of the block's columns to at least this many others on average: CHOLMOD's
# own elimination of such a block fills it in, without BLAS, and its simplicial trial alone can cost seconds
# (docs/performance-scale.md, fifteenth session).
SCHUR_ALONE_MIN_DEGREE = 64
# Small systems can be held dense (DenseFactor: the first term eliminated level by level, the rest with X and y
# one dense matrix of order at most DENSE_MAX_ORDER): there CHOLMOD's and scipy's fixed costs per call and the
# block-pair loop outweigh the arithmetic (sleepstudy: 41 against 91 us an evaluation), and the exact gradient
# (core/gradient.py) is available. Chosen by default; factorization="dense" forces it. Up to DENSE_MAX_Q columns,
# except a lone term eliminated level by level, whose work grows with its levels (a growth curve of 2,410 schools,
# mlmRev's Chem97: 5 Newton steps with the exact Hessian in 28 ms, where CHOLMOD with BOBYQA took 56 evaluations).
DENSE_BY_DEFAULT = True
DENSE_MAX_Q = 1000
DENSE_MAX_ORDER = 64
# ... and up to this order after an eliminated first term where the terms after it are scalar (variance components,
# a random intercept beside many fixed effects): scored (fit/scoring.py) or with the exact Hessian, quicker there than
# the Schur form's scoring or CHOLMOD's BOBYQA; from ~150 the Schur form is as quick (docs/performance-scale.md,
# sixteenth session) ...
DENSE_SCALAR_REST_MAX_ORDER = 128
# ... and up to this one with slopes, with the exact Hessian (ProfiledGradient.eliminated_hessian): 3-5 evaluations
# where the Schur form's BOBYQA took 120-220 (simulated crossed subjects x items with slopes, orders 83-93 after the
# first term: 0.15-0.25 of the time) and CHOLMOD's 140-170 (children in 40 schools, 83: 0.6); at 103 (children in 50
# schools) the Schur form's information steps were 1.3x quicker; where eliminating the first term fills the rest
# (`densely_linked`: crossed) up to DENSE_CROSSED_REST_MAX_ORDER (subjects x items with slopes, 300 x 100, 203 after
# the first term: 4 evaluations, 0.1 s, where the Schur form's BOBYQA took 247, 0.9 s; nineteenth session)
DENSE_SLOPES_REST_MAX_ORDER = 96
DENSE_CROSSED_REST_MAX_ORDER = 400
# Several terms are held whole (nothing eliminated) up to this order: there the exact Hessian applies (ProfiledGradient.
# compact_hessian), and one dense matrix costs less than the eliminated layout's batched per-level algebra. Measured
# (REML fits): mlmRev's Mmmec, nested, order 89: 4.6 ms whole against 9.2 eliminated; simulated nested 12 x 8 levels
# with slopes, order 123: 5.5 against 9.4, but 20 x 10 levels, order 223: 11.5 against 6.2. Crossed designs were
# held whole up to order 400 before the eliminated layout had its Hessian (eliminated_hessian); with it, eliminated
# took 0.36-0.9 of the whole's time from order 128 to 400 (subjects x items with slopes, 60 x 10 to 150 x 30; nlme's
# MathAchieve, schools' slopes beside 2-4 levels of minority and sex, order 327: 27-45 ms against 77-142; twentieth
# session).
DENSE_WHOLE_MAX_ORDER = 128
# ... and terms with slopes up to this order where the first term has at most half the columns: eliminated, it would
# leave most of the system in the dense rest (statsmodels' `re_formula="1 + x"` in 40 groups beside a variance
# component of 120 levels, order 203: 13 ms whole, 17 eliminated); where it has more, eliminating pays (nested
# schools with slopes and classes, orders 183-243: 9-15 ms whole, 9-11 eliminated; nineteenth session)
DENSE_WHOLE_SLOPES_MAX_ORDER = 256
# Where a term has slopes (k > 1), CHOLMOD's factors come with no gradient (BOBYQA) and the Schur form's with the
# exact one and the average information (Newton steps): a factorization in CHOLMOD counts this many of the Schur
# form's in the trial. Measured on mlmRev's egsingle (children in schools, slopes at both levels): simplicial
# refactorizations of 0.19 ms, 185 BOBYQA evaluations of 0.65 ms (125 ms); the Schur form's of 0.66 ms, 9 Newton
# points of 5.6 ms (51 ms): the two fits cost the same at a weight of ~8.6. It was 6, but on a loaded machine the
# ratio of the two refactorizations rose from 5.1 to 5.5-6.3 (and to 9-11 at times with many busy processes) and
# the race went to CHOLMOD (162 ms against 55): 10 keeps the side that wins.
CHOLMOD_WITHOUT_GRADIENT_WEIGHT = 10.0
# A trial is the least of this many timed refactorizations where the first took under TRIAL_REPEAT_MAX_SECONDS of
# CPU: beside busy processes a call of the Schur form was at times descheduled (21 ms of wall time for 1 ms of CPU),
# which alone decided the race. egsingle in fresh processes beside two CPU-bound loops: CHOLMOD 3 times in 10
# before, 0 in 10 after (beside one loop: 1 in 12, 0 in 12).
TRIAL_REPEATS = 3
TRIAL_REPEAT_MAX_SECONDS = 0.005
# refined_last_term: a last term of at most this many columns (its block's factorization each trial, ~0.1 ms at 28) ...
REFINED_TERM_MAX_COLUMNS = 64
# ... its theta to this relative precision (the Newton steps' on the deviance, from central differences of this
# step in log theta; at most this many steps)
REFINED_TOLERANCE = 1e-8
REFINED_DIFFERENCE_STEP = 1e-3
REFINED_MAX_STEPS = 8


@dataclass(frozen=True)
class _PairTargets:
    """The (Z'Z) blocks between terms t and s, and the entries of A (rows, cols) their products land in,
    before A's storage order (and so the positions) is known."""

    t: int
    s: int
    blocks: np.ndarray
    keep: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


@dataclass(frozen=True)
class _BlockPair:
    """The (Z'Z) blocks between term t (rows) and term s (columns), and where their products land in A."""

    t: int
    s: int
    blocks: np.ndarray  # (m, k_t, k_s) dense blocks of Z'Z, one per level pair present
    keep: np.ndarray  # flat indices into the (m, k_t, k_s) product that fall in A's lower triangle
    positions: np.ndarray  # A.data positions of those entries


def profiled_deviance_value(logdet_L2, logdet_RX2, r2, nu: int, sum_log_weights: float, reml: bool):
    """The profiled deviance from an evaluation's log-determinants and r^2 (numbers, or arrays of them), with
    nu = n (ML) or n - p (REML) degrees of freedom."""
    dev = logdet_L2 + nu * (1.0 + LOG_2PI + np.log(r2 / nu)) - sum_log_weights
    return dev + logdet_RX2 if reml else dev


def rx_transpose_solve(RX: np.ndarray, B: np.ndarray) -> np.ndarray:
    """R_X^{-T} B for the upper triangular R_X: LAPACK's trtrs as it is (scipy's solve_triangular checks and
    converts its arguments, several times the solve's own cost at these sizes)."""
    X, info = lapack.dtrtrs(RX, B, lower=0, trans=1)
    if info != 0:
        raise RankDeficientError("the fixed effects are not estimable at this theta (R_X is singular)")
    return X


@functools.lru_cache(maxsize=16)
def lower_pairs(k: int) -> tuple[tuple[int, int], ...]:
    """The (a, b), a >= b, of a k x k matrix's lower triangle in np.tril_indices' order (a tuple, computed once)."""
    return tuple(zip(*(index.tolist() for index in np.tril_indices(k))))


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation at theta produces; enough for the deviance and for the solution."""

    theta: np.ndarray | None  # None for the optimizer's evaluations in working coordinates (evaluate_working)
    logdet_L2: float  # log |L|^2
    logdet_RX2: float  # log |R_X|^2
    RZX: np.ndarray
    cu: np.ndarray
    RX: np.ndarray  # upper triangular p x p
    cbeta: np.ndarray
    r2: float  # penalized residual sum of squares
    factors: list = field(default_factory=list)  # the templates applied to the system's columns (relcov.system_factors)
    single: bool = False  # the factor in single precision (PenalizedSystem.evaluate): the deviance ~1e-5 off

    @property
    def feasible(self) -> bool:
        """False where X'V^{-1}X was lost to rounding (theta far too large): no deviance, no solution."""
        return bool(np.isfinite(self.logdet_RX2))


@dataclass(frozen=True)
class Solution:
    """The conditional estimates at theta: fixed effects, spherical and actual random effects, sigma^2."""

    theta: np.ndarray
    beta: np.ndarray
    u: np.ndarray
    b: np.ndarray
    sigma2: float
    deviance: float
    evaluation: Evaluation


@functools.lru_cache(maxsize=16)
def _strict_upper(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k, 1)


class PenalizedSystem:
    """Deviance of the model as a function of theta, from the cross-products and the term layout."""

    def __init__(
        self,
        cross: CrossProducts,
        relcov: RelativeCovariance,
        factorization: str | None = None,
        diagonal_runs: tuple[tuple[int, int], ...] = (),
    ):
        """`factorization`: None to measure and pick, or force "simplicial", "supernodal" or "schur".
        `diagonal_runs`: runs [start, stop) of scalar terms of one grouping (terms.same_grouping_runs), which
        `merged_system` takes as one term each."""
        if cross.ZtZ.shape[0] != relcov.q:
            raise ValueError(f"Z has {cross.ZtZ.shape[0]} columns but the terms describe {relcov.q}")
        self.cross = cross
        self.relcov = relcov
        self.diagonal_runs = tuple(diagonal_runs)
        self.n_evaluations = 0
        self._linked_share: float | None = None  # (_linked_density's)
        if factorization is not None or not self.diagonal_runs:
            self._factor = self._made_factor(factorization)
        else:  # (x || g): chosen on first use, which a fit solved through merged_system's system may never make
            self._factor_pending = True
        self._factor_theta: np.ndarray | None = None
        self._factor_single = False  # the factor at _factor_theta in single precision (evaluate's `single`)
        self._factor_factors: list[np.ndarray] | None = None
        self._last_evaluation: Evaluation | None = None
        self._gradient: ProfiledGradient | SchurGradient | None = None
        self._gradient_point: tuple | None = None  # (working, evaluation, beta, u) of the last gradient

    # -- pickling: the factorization is dropped and rebuilt on first use ------------------------------------

    def __getstate__(self):
        # CHOLMOD's factor cannot be pickled; its analysis is rebuilt from A (kept) in the same mode, and the
        # next evaluation refactors at its theta, so the numbers are the ones before pickling.
        state = dict(self.__dict__)
        factor = state.pop("_factor", None)
        if factor is not None:
            state["_factor_rebuild"] = (factor.mode, getattr(factor, "update", None))
        state.update(
            _factor_theta=None, _factor_factors=None, _last_evaluation=None, _gradient=None, _gradient_point=None
        )
        return state

    def _made_factor(self, factorization: str | None):
        # Small systems run single-threaded (see threads.py): the timed choice must see that setting too.
        with blas_threads(single_threaded(self.relcov.q)):
            return self._choose_factorization() if factorization is None else self._forced(factorization)

    @property
    def factorization_mode(self) -> str:
        """ "simplicial", "supernodal", "schur" or "dense"."""
        return self._factor.mode

    @property
    def single_threaded(self) -> bool:
        """Whether work on this system runs with one BLAS thread (threads.single_threaded; before the factorization
        is chosen, the setting its choice runs under)."""
        factor = self.__dict__.get("_factor")
        return single_threaded(self.relcov.q, None if factor is None else factor.mode)

    def with_response(self, cross: CrossProducts) -> "PenalizedSystem":
        """The same model for another response (`cross`: the design's cross-products with it, as
        CrossProducts.with_response gives them): the analysed factorization is handed over, so a refit costs
        no symbolic analysis; this system rebuilds its own if it is evaluated again."""
        if cross.ZtZ.shape != self.cross.ZtZ.shape or cross.p != self.cross.p:
            raise ValueError("with_response needs the cross-products of the same design")
        self._factor  # noqa: B018 (chosen now where its choice was left to first use: handed over below)
        other = copy.copy(self)
        other.cross = cross
        other.n_evaluations = 0
        other._factor_theta = other._factor_factors = other._last_evaluation = None
        other._gradient = other._gradient_point = None
        if self.factorization_mode == "dense":  # the dense factor holds the response's sums: a new one, cheap
            other._factor = other._dense_factor(forced=True)
        elif "_factor" in self.__dict__:  # the factor goes with `other`; this one rebuilds on use
            factor = self.__dict__.pop("_factor")
            self._factor_rebuild = (factor.mode, getattr(factor, "update", None))
            self._factor_theta = self._factor_factors = self._last_evaluation = None
        return other

    def merged_system(self) -> "PenalizedSystem":
        """The same model with each of `diagonal_runs` as one term with a diagonal covariance (RelativeCovariance.
        merged): the same deviance at every theta, from the same cross-products with the columns reordered. One
        term of k columns is eliminated level by level where k scalar terms were not (lme4's `(x || g)`): its
        factorization and the optimizer's derivatives are those of a correlated term's."""
        relcov, order = self._merged
        return PenalizedSystem(self.cross.permuted(order), relcov)

    @property
    def merged_order(self) -> np.ndarray:
        """merged_system's columns as positions among this system's (a response's Z'y taken to its order)."""
        return self._merged[1]

    @property
    def one_grouping(self) -> bool:
        """Whether the model is one term once `diagonal_runs` are merged (one term, or lme4's `(x || g)` alone),
        read off merged_system's covariance without building it."""
        return len((self._merged[0] if self.diagonal_runs else self.relcov).blocks) == 1

    @functools.cached_property  # (merged_system's, and solution_from's order)
    def _merged(self) -> "tuple[RelativeCovariance, np.ndarray]":
        return self.relcov.merged(self.diagonal_runs)

    def __getattr__(self, name):
        # Only reached when normal lookup fails: `_factor` until its first use, after unpickling or where its choice
        # was left to then.
        if name == "_factor" and self.__dict__.pop("_factor_pending", False):
            self._factor = self._made_factor(None)
            return self._factor
        if name == "_factor" and "_factor_rebuild" in self.__dict__:
            mode, update = self.__dict__.pop("_factor_rebuild")
            with self.threads():
                if mode == "schur":
                    self._factor = SchurFactor(self._A, self.cross.ZtZ, self.relcov, update or "auto")
                elif mode == "dense":
                    self._factor = self._dense_factor(forced=True)
                else:
                    self._factor = CholmodFactor(self._A, mode)
            return self._factor
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- structure, built once -------------------------------------------------------------------------

    @property
    def _pairs(self) -> list[_BlockPair]:
        return self._structure[0]

    @property
    def _A(self) -> sp.csc_matrix:
        return self._structure[1]

    @property
    def _structure(self) -> tuple[list[_BlockPair], sp.csc_matrix]:
        """A's pattern and the block pairs that fill it, built on first use (a system held dense never needs
        them: for sleepstudy they were half of building the system)."""
        structure = self.__dict__.get("_structure_built")
        if structure is None:
            structure = self.__dict__["_structure_built"] = self._block_structure()
        return structure

    def _block_structure(self) -> tuple[list[_BlockPair], sp.csc_matrix]:
        ZtZ = self.cross.ZtZ
        rc = self.relcov
        scalar = _scalar_structure(ZtZ, rc)
        if scalar is not None:
            return scalar
        raw: list[_PairTargets] = []
        for t, ((n_t, tmpl_t), cols_t) in enumerate(zip(rc.blocks, rc.column_slices)):
            for s in range(t + 1):
                (n_s, tmpl_s), cols_s = rc.blocks[s], rc.column_slices[s]
                raw.append(
                    _pair_blocks(
                        ZtZ[cols_t, cols_s].tocoo(),  # (columns sliced first: the rows of only those)
                        t,
                        s,
                        n_t,
                        tmpl_t.k,
                        n_s,
                        tmpl_s.k,
                        cols_t.start,
                        cols_s.start,
                    )
                )
        rows = np.concatenate([r.rows for r in raw])
        cols = np.concatenate([r.cols for r in raw])
        n_targets = rows.shape[0]
        # Number the targets, let scipy sort them into CSC order, and read back where each one went.
        marker = sp.csc_matrix((np.arange(1, n_targets + 1, dtype=float), (rows, cols)), shape=ZtZ.shape)
        marker.sort_indices()
        position_of = np.empty(n_targets, dtype=np.int64)
        position_of[marker.data.astype(np.int64) - 1] = np.arange(n_targets)
        pairs, start = [], 0
        for r in raw:
            pairs.append(_BlockPair(r.t, r.s, r.blocks, r.keep, position_of[start : start + r.rows.shape[0]]))
            start += r.rows.shape[0]
        A = sp.csc_matrix((np.zeros(n_targets), marker.indices, marker.indptr), shape=ZtZ.shape)
        return pairs, A

    def threads(self):
        """The BLAS-thread setting for work on this system (single-threaded when it is small)."""
        return blas_threads(self.single_threaded)

    def _forced(self, name: str):
        if name in ("simplicial", "supernodal"):
            return CholmodFactor(self._A, name)
        if name == "dense":
            return self._dense_factor(forced=True)
        n1, template1 = self.relcov.blocks[0]
        if name == "schur" and schur_applicable(self._A, n1 * template1.k, template1.k):
            return SchurFactor(self._A, self.cross.ZtZ, self.relcov)
        raise ValueError(
            f"factorization {name!r} is not available for this model (choose simplicial, supernodal"
            ", dense, or schur when the first term's block is block diagonal)"
        )

    def _choose_factorization(self):
        """The fastest factorization of A + I for this pattern, measured rather than guessed where it is close.

        CHOLMOD's own rule (supernodal when flops / nnz(L) >= 40) misjudges crossed designs whose first factor
        has many small supernodes that each update a dense block (docs/performance-scale.md, "Choosing the
        factorization", has the timings). So: time simplicial (small systems), the exact elimination of the
        first term with a dense Schur complement (SchurFactor) where that applies and could win, and supernodal
        unless simplicial is already fast. Where the first term's levels link the other columns densely (see
        `_schur_alone`) the Schur form is taken without trials, which would cost more than they save. With random
        slopes, CHOLMOD's times count CHOLMOD_WITHOUT_GRADIENT_WEIGHT times against a Schur form with the gradient.
        """
        dense = self._dense_factor() if DENSE_BY_DEFAULT else None
        if dense is not None:
            return dense
        schur_alone = self._schur_alone()
        if schur_alone is not None:
            return schur_alone
        small = self._A.nnz <= TRIAL_FACTORIZATION_MAX_NNZ
        # The same pattern takes the mode measured for it before in this process: timings near a tie would
        # otherwise send two fits of one design down different optimizers (the gradient's where the Schur form
        # wins), to optima that differ at rounding level of a flat likelihood.
        key = _pattern_key(self._A, self.relcov) if small else None
        remembered = _CHOSEN_MODES.get(key) if key is not None else None
        if remembered == "schur":
            return SchurFactor(self._A, self.cross.ZtZ, self.relcov)
        if remembered is not None:
            return CholmodFactor(self._A, remembered)
        chosen = self._timed_choice(small)
        if key is not None:
            if len(_CHOSEN_MODES) >= CHOSEN_MODES_KEPT:
                _CHOSEN_MODES.pop(next(iter(_CHOSEN_MODES)))
            _CHOSEN_MODES[key] = chosen.mode
        return chosen

    def _timed_choice(self, small: bool):
        """_choose_factorization's trials: the fastest candidate, as measured now (at lme4's start)."""
        factors = self._write_values(self.relcov.factors(self.relcov.start()))
        candidates = [CholmodFactor(self._A, "simplicial")] if small else []
        timings = [_time_refactorization(candidates[0], self._A, factors)] if small else []
        slopes = not self.scalar_terms
        # the Schur form's derivative methods: the gradient with slopes, the scoring steps for variance components
        scored = self.scorable
        weight = CHOLMOD_WITHOUT_GRADIENT_WEIGHT if slopes or scored else 1.0
        schur = self._schur_candidate(timings[0] * weight if small else np.inf)
        if schur is not None:
            candidates.append(schur)
            if not (schur.supports_gradient if slopes else scored):
                weight = 1.0
            timings = [t * weight for t in timings]
            if small:  # a race against simplicial; a large system has no other candidate (see below)
                with blas_threads(True):  # as it will run (threads.py): BLAS threads only for its big Cholesky
                    timings.append(_time_refactorization(schur, self._A, factors, min(timings)))
        else:
            weight = 1.0
        # On large systems the Schur form beat supernodal wherever it was measured (docs/performance-scale.md),
        # and a trial there costs two large factorizations: a lone candidate is not timed.
        if (not small and schur is None) or (small and timings[0] / weight >= FAST_FACTORIZATION_SECONDS):
            candidates.append(CholmodFactor(self._A, "supernodal"))
            if len(candidates) > 1:  # a lone candidate needs no trial (a large one costs seconds)
                timings.append(weight * _time_refactorization(candidates[-1], self._A, factors, min(timings)))
        return candidates[int(np.argmin(timings))] if len(candidates) > 1 else candidates[0]

    def _dense_factor(self, forced: bool = False) -> DenseFactor | None:
        """The DenseFactor, eliminating the first term where the whole system is above DENSE_MAX_ORDER and the
        term's block is block diagonal; None where the system is too large for it (unless `forced`)."""
        rc = self.relcov
        q1 = rc.blocks[0][0] * rc.blocks[0][1].k if rc.blocks else 0
        # below that order one dense matrix costs less: numpy's batched per-level Cholesky and solve cost more per
        # call than the flops they save (sleepstudy, q = 36: 46 us per evaluation against 65); but one k x k term
        # (k > 1) alone is evaluated level by level in compiled code (kernels.py; sleepstudy: 8 us)
        k1 = rc.blocks[0][1].k
        compiled = len(rc.blocks) == 1 and k1 > 1
        order = rc.q + self.cross.p + 1
        whole = DENSE_MAX_ORDER  # one term: eliminated level by level above it (its Hessian by levels too)
        if len(rc.blocks) > 1:
            whole = DENSE_WHOLE_MAX_ORDER
            slopes = any(template.k > 1 for _, template in rc.blocks)  # (crossed scalar terms: the Schur form scores)
            if slopes and whole < order <= DENSE_WHOLE_SLOPES_MAX_ORDER and 2 * q1 <= rc.q:
                whole = order  # (eliminating the first term would leave most of the system in the dense rest)
        eliminate = (compiled or order > whole) and schur_applicable(self.cross.ZtZ, q1, k1)
        q1 = q1 if eliminate else 0
        too_many = rc.q > DENSE_MAX_Q and q1 < rc.q
        rest_scalar = all(template.k == 1 for _, template in rc.blocks[1:])
        rest = DENSE_SCALAR_REST_MAX_ORDER if rest_scalar else DENSE_SLOPES_REST_MAX_ORDER
        order2 = rc.q - q1 + self.cross.p + 1
        if q1 and not rest_scalar and rest < order2 <= DENSE_CROSSED_REST_MAX_ORDER and self.densely_linked:
            rest = order2  # (crossed: CHOLMOD's and the Schur form's factors fill in as this one does)
        if not forced and (too_many or order2 > (rest if q1 else whole)):
            return None
        return DenseFactor(self.cross, rc, eliminate)

    def _schur_alone(self):
        """The Schur form, untimed, where the fill makes any factor of the block after the first term dense.

        Eliminating the first term links two columns of the q2 x q2 block wherever some level of it touches
        both; where that pattern is at least SCHUR_ALONE_MIN_DENSITY full, or links each column to at least
        SCHUR_ALONE_MIN_DEGREE others, the block's factor fills in (almost) completely, so CHOLMOD factors the same
        dense block with more bookkeeping, and its simplicial trial can
        take seconds. Measured, Schur / simplicial / supernodal per factorization: InstEval (pattern 21% full)
        23.7 / 121 / 42.6 ms, seed crossed design 0.36 / 0.93 / 13.2 ms, 3,000 x 300 crossed 8.9 / 203 / 604 ms,
        100,000-row slopes with 2,000 levels of b 119 / 2,197 / 122 ms, 40,000 x 4,000 crossed (400,000 rows)
        0.76 / 16.3 / 1.03 s (pattern 22% full; the trials took 41 s); nested designs (pattern: the diagonal) go to
        the trials, where simplicial wins. Blocks of fewer than SCHUR_ALONE_MIN_ORDER columns are left to the
        (sub-millisecond) trials: there simplicial's lower overhead can win (30 columns: 0.05 against 0.19 ms).
        """
        if self.relcov.after_first < SCHUR_ALONE_MIN_ORDER:
            return None
        density = self._linked_density()
        if not (density >= SCHUR_ALONE_MIN_DENSITY or density * self.relcov.after_first >= SCHUR_ALONE_MIN_DEGREE):
            return None
        return self._schur_candidate(np.inf)

    @property
    def densely_linked(self) -> bool:
        """Whether eliminating the first term fills at least SCHUR_ALONE_MIN_DENSITY of the block after it (a
        crossed design; False for nested ones, or where the first term's levels are linked among themselves)."""
        return self._linked_density() >= SCHUR_ALONE_MIN_DENSITY

    def _linked_density(self) -> float:
        """The share of the block after the first term that eliminating it fills (0 where the Schur form does not
        apply), computed once."""
        if self._linked_share is None:
            n1, template1 = self.relcov.blocks[0]
            q1 = n1 * template1.k
            # (Z'Z's pattern, as _dense_factor reads it: building A for this cost 2.4 ms of a 20 ms nested fit)
            applies = q1 < self.relcov.q and schur_applicable(self.cross.ZtZ, q1, template1.k)
            self._linked_share = _complement_density(self.cross.ZtZ, q1, clear=_clearly_linked) if applies else 0.0
        return float(self._linked_share)

    def _schur_candidate(self, time_to_beat: float):
        """A SchurFactor worth a trial, or None: its dense q2 x q2 Cholesky must be able to beat `time_to_beat`
        and its two q2 x q2 matrices must fit in memory."""
        n1, template1 = self.relcov.blocks[0]
        q1 = n1 * template1.k
        q2 = self.relcov.q - q1
        if not 0 < q2 or 2 * 8 * q2**2 > SCHUR_MEMORY_FRACTION * physical_memory():
            return None
        if q2**3 / 3 / DENSE_FLOPS_PER_SECOND >= time_to_beat or not schur_applicable(self._A, q1, template1.k):
            return None
        return SchurFactor(self._A, self.cross.ZtZ, self.relcov)

    # -- evaluation --------------------------------------------------------------------------------------

    def _refactor(self, theta: np.ndarray | None, factors: list[np.ndarray], single: bool = False) -> list[np.ndarray]:
        """Refactor with the system's templates `factors`, which report as `theta` (`single`: see evaluate)."""
        if not isinstance(self._factor, DenseFactor):  # which reads the templates, not A
            self._write_values(factors)
        if single and isinstance(self._factor, SchurFactor):
            self._factor.refactor(self._A, factors, single=True)
            self._factor_single = self._factor.single
        else:
            self._factor_single = False
            self._factor.refactor(self._A, factors)
        self._factor_theta = None if theta is None else np.array(theta, dtype=float)
        self._factor_factors = factors
        return factors

    def _factor_at(self, theta, single: bool = False) -> list[np.ndarray]:
        """The system's templates at theta, with the factor refactored there unless it already is (`single`: a
        factor in single precision will do)."""
        theta = np.asarray(theta, dtype=float)
        if (
            self._factor_theta is None
            or self._factor_factors is None
            or not np.array_equal(self._factor_theta, theta)
            or not self._factor_serves(single)
        ):
            return self._refactor(theta, self.relcov.system_factors(theta))
        return self._factor_factors

    def _factor_serves(self, single: bool) -> bool:
        """Whether the factor's precision serves a request (`single`: one in single precision will do)."""
        return single or not self._factor_single

    def _write_values(self, factors: list[np.ndarray], term: int | None = None) -> list[np.ndarray]:
        """Write the values of Lambda' Z'Z Lambda (lower triangle) into the fixed pattern of A (`term`: only its
        blocks, where only its template changed)."""
        data = self._A.data
        for pair in self._pairs:
            if term is not None and term not in (pair.t, pair.s):
                continue
            Tt, Ts = factors[pair.t], factors[pair.s]
            if Tt.shape == (1, 1) and Ts.shape == (1, 1):
                vals = (Tt[0, 0] * Ts[0, 0]) * pair.blocks.reshape(-1)
            else:
                vals = _sandwich(Tt, pair.blocks, Ts).reshape(-1)
            data[pair.positions] = vals[pair.keep]
        return factors

    def evaluate(self, theta, single: bool = False) -> Evaluation:
        """The evaluation at theta. `single`: the Schur form's dense factor in single precision where the system has
        one (SchurFactor's `single`), for a point far from the optimum: its deviance ~1e-5 off (InstEval), everything
        else as from an exact factor of a matrix within ~1e-7 of the system's. A later call without `single` (the
        fit's end, the solution) evaluates again in double."""
        theta = np.asarray(theta, dtype=float)
        return self._evaluate_at(theta, self.relcov.system_factors(theta), single)

    def evaluate_working(self, working, reported: bool = True) -> Evaluation:
        """The evaluation at the optimizer's coordinates (relcov.working_theta). With `reported`, it carries the
        reported theta, and a solve at that theta reuses it; without (the optimizer's calls: the conversion
        costs a QR per term), its theta is None unless an evaluation at the same templates is reused."""
        working = np.asarray(working, dtype=float)
        if not self.relcov.transformed:
            return self.evaluate(working)
        return self._evaluate_at(
            self.relcov.reported_theta(working) if reported else None, self.relcov.factors(working)
        )

    def _evaluate_at(self, theta: np.ndarray | None, factors: list[np.ndarray], single: bool = False) -> Evaluation:
        """_evaluate, or the last evaluation where it was at these templates and the factor still is (a gradient
        after its point's value, the solve at the optimizer's end point), reporting `theta` where given."""
        at = self._factor_factors
        if (
            at is None
            or len(at) != len(factors)
            or not all(np.array_equal(a, b) for a, b in zip(factors, at))
            or not self._factor_serves(single)
        ):
            return self._evaluate(theta, factors, single=single)
        last = self._last_evaluation
        if last is None or last.factors is not at:  # a dense factor left by a gradient's or Hessian's step
            if not isinstance(self._factor, DenseFactor):
                return self._evaluate(theta, factors)
            if theta is not None:
                self._factor_theta = np.array(theta, dtype=float)
            return self._evaluate(theta, at, refactor=False)
        if theta is not None and (last.theta is None or not np.array_equal(last.theta, theta)):
            last = self._last_evaluation = replace(last, theta=np.array(theta, dtype=float))
            self._factor_theta = np.array(theta, dtype=float)
        return last

    def working_deviance(self, working, reml: bool) -> float:
        """`deviance` in the optimizer's coordinates."""
        compiled = self._compiled_single_term(working, reml)
        if compiled is not None:
            return compiled[0]
        return self.profiled_deviance(self.evaluate_working(working, reported=False), reml)

    def _compiled_single_term(self, working, reml: bool) -> tuple[float, np.ndarray] | None:
        """(deviance, gradient) in one compiled pass where the system is one k x k term (k > 1) eliminated level
        by level (a growth curve's: ProfiledGradient.single_term_compiled), the factor installed there; else None."""
        factors = self.relcov.factors(working)
        parts = self._install_single_term(factors, reml)
        if parts is None:
            return None
        self._last_evaluation = self._factor_theta = None
        logdet, logdet_RX2, r2, gradient = parts
        return self._deviance(logdet, logdet_RX2, r2, reml), gradient

    def _install_single_term(self, factors, reml: bool) -> tuple[float, float, float, np.ndarray] | None:
        """The factor at the templates `factors` by the compiled pass of a system of one k x k term (k > 1)
        (ProfiledGradient.single_term_compiled, cheaper than numpy's factorization), installed there; its
        (log |L|^2, log |R_X|^2, r^2, gradient). None where the system is not such a one, the template is not lower
        triangular (the kernel's assumption; relcov.system_factors' need not be), or the kernel cannot."""
        factor = self._factor
        if not (isinstance(factor, DenseFactor) and factor.q2 == 0 and factor.k1 > 1):
            return None
        if factors[0][_strict_upper(factor.k1)].any():
            return None
        if self._gradient is None:
            self._gradient = ProfiledGradient(factor, self.cross, self.relcov)
        assert isinstance(self._gradient, ProfiledGradient)  # a DenseFactor's
        parts = self._gradient.single_term_compiled(factors, reml, self.dof(reml))
        if parts is None:
            return None
        logdet, logdet_RX2, r2, gradient, (L11, W, LS) = parts
        factor.install(L11, W, LS, logdet, logdet_RX2, r2)
        self._factor_factors = factors
        self.n_evaluations += 1
        return logdet, logdet_RX2, r2, gradient

    @property
    def supports_gradient(self) -> bool:
        """Whether `working_deviance_gradient` is available (core/gradient.py): the system held dense, or in the
        Schur form with the pair map (any terms after the first: Lambda_2 diagonal or block diagonal)."""
        factor = self._factor
        return isinstance(factor, DenseFactor) or (isinstance(factor, SchurFactor) and factor.supports_gradient)

    @property
    def supports_information(self) -> bool:
        """Whether Newton steps with `working_information` pay: the Schur form (random slopes on crossed designs),
        where an evaluation costs far more than the information's small array operations. On systems held dense
        an evaluation costs less than those, and L-BFGS-B's extra evaluations cost less than the information
        (docs/lme4.md, "optimizer")."""
        return self.supports_gradient and isinstance(self._factor, SchurFactor)

    def working_deviance_gradient(self, working, reml: bool) -> tuple[float, np.ndarray]:
        """The deviance and its exact gradient in the optimizer's coordinates (`supports_gradient` systems);
        where the deviance is not finite, (inf, zeros)."""
        compiled = self._compiled_single_term(working, reml)
        if compiled is not None:
            return compiled
        factor = self._factor
        if self._gradient is None:
            kind = ProfiledGradient if isinstance(factor, DenseFactor) else SchurGradient
            self._gradient = kind(factor, self.cross, self.relcov)
        gradient_of = self._gradient
        # one dense factor, or one term by levels: no Evaluation, no solves
        if isinstance(gradient_of, ProfiledGradient) and (factor.q1 == 0 or factor.q2 == 0):
            factors = self.relcov.factors(np.asarray(working, dtype=float))
            self._last_evaluation = None
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if not self._refactor_dense(None, factors) or not factor.finite:
                    return np.inf, np.zeros(self.relcov.n_theta)
                compact = gradient_of.compact if factor.q1 == 0 else gradient_of.single_term
                gradient = compact(factors, reml, self.dof(reml))
            if gradient is not None:
                return self._deviance(factor.logdet(), factor.logdet_RX2, factor.r2, reml), gradient
        ev = self.evaluate_working(working, reported=False)
        deviance = self.profiled_deviance(ev, reml)
        if not np.isfinite(deviance):
            return deviance, np.zeros(self.relcov.n_theta)
        beta, u = self.modes(ev)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            gradient = gradient_of(ev, beta, u, reml, self.dof(reml))
        self._gradient_point = (np.array(working, dtype=float), ev, beta, u)  # for working_information
        return deviance, gradient

    @property
    def supports_hessian(self) -> bool:
        """Whether `working_deviance_hessian` is available: a system held dense, whole (ProfiledGradient.
        compact_hessian), one k x k term eliminated level by level, a growth curve's (single_term_hessian; a random
        intercept's: scalar_term_hessian), or the first term eliminated beside others (eliminated_hessian)."""
        return isinstance(self._factor, DenseFactor)

    @property
    def first_eliminated_beside_others(self) -> bool:
        """Whether the system is held dense with its first term eliminated level by level and terms after it."""
        factor = self._factor
        return isinstance(factor, DenseFactor) and factor.q1 > 0 and factor.q2 > 0

    def working_deviance_hessian(self, working, reml: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(deviance, exact gradient, exact Hessian) in the optimizer's coordinates (`supports_hessian` systems);
        (inf, zeros, None) where the deviance is not finite, and a Hessian of None where r^2 is not in the factor."""
        working = np.asarray(working, dtype=float)
        factor = self._factor
        n = self.relcov.n_theta
        if self._gradient is None:
            self._gradient = ProfiledGradient(factor, self.cross, self.relcov)
        derivatives = self._gradient
        assert isinstance(derivatives, ProfiledGradient)  # a DenseFactor's
        if factor.q2 == 0:  # one term alone: all three from the cross-products, in one pass over its levels
            # (a random intercept's in numpy, a k x k term's compiled; the factor is left where it was: the solve at
            # the end point refactors)
            of_term = derivatives.scalar_term_hessian if factor.k1 == 1 else derivatives.single_term_hessian
            found = of_term(self.relcov.factors(working), reml, self.dof(reml))
            if found is not None:
                gradient, hessian, (logdet, logdet_RX2, r2) = found
                self.n_evaluations += 1
                return self._deviance(logdet, logdet_RX2, r2, reml), gradient, hessian
            deviance, gradient = self.working_deviance_gradient(working, reml)  # (None: a case the factor decides)
            return deviance, gradient, None
        if factor.q1:  # the first term eliminated beside others: from the evaluation and its modes
            ev = self.evaluate_working(working, reported=False)
            deviance = self.profiled_deviance(ev, reml)
            if not np.isfinite(deviance) or not factor.r2 > 0:
                return deviance, np.zeros(n), None
            beta, u = self.modes(ev)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                gradient, hessian = derivatives.eliminated_hessian(working, ev.factors, beta, u, reml, self.dof(reml))
            return deviance, gradient, hessian
        factors = self.relcov.factors(working)
        self._last_evaluation = None
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if not self._refactor_dense(None, factors) or not factor.finite:
                return np.inf, np.zeros(n), None
            parts = derivatives.compact_hessian(working, reml, self.dof(reml))
        deviance = self._deviance(factor.logdet(), factor.logdet_RX2, factor.r2, reml)
        if parts is None:
            return deviance, np.zeros(n), None
        return deviance, parts[0], parts[1]

    def working_information(self, working, reml: bool) -> np.ndarray | None:
        """An approximation to the profiled deviance's Hessian in the optimizer's coordinates: twice the average
        information (average_information) taken from psi to (sigma^2, theta) by the Jacobian and profiled over
        sigma^2 (its Schur complement). From the gradient's evaluation at `working` where that was the last one,
        else from a new one; None where the deviance is not finite there. Newton steps with it and the exact
        gradient: optimize.information_newton (docs/performance-scale.md has what they save)."""
        working = np.asarray(working, dtype=float)
        point = self._gradient_point
        if point is not None and np.array_equal(point[0], working) and self._last_evaluation is point[1]:
            _, ev, beta, u = point
        else:
            ev = self.evaluate_working(working, reported=False)
            if not np.isfinite(self.profiled_deviance(ev, reml)):
                return None
            beta, u = self.modes(ev)
        rc = self.relcov
        factors = ev.factors  # (the templates at `working`: evaluate_working's)
        AI = self.average_information(ev, beta, u, reml)  # sigma^4 AI: the profiled result is free of sigma^2
        # d psi / d (sigma^2, theta): psi_(t, ab) = sigma^2 (T T')_ab, T linear in theta (each theta column / sigma^2)
        J = np.zeros((AI.shape[0], rc.n_theta + 1))
        J[0, 0] = 1.0
        row = 1
        for (_, template), sl, T in zip(rc.blocks, rc.theta_slices, factors):
            k = template.k
            lower = np.tril_indices(k)
            J[row : row + lower[0].size, 0] = (T @ T.T)[lower]
            for i, (a, b) in enumerate(template.positions):
                E = np.zeros((k, k))
                E[a, b] = 1.0
                J[row : row + lower[0].size, sl.start + 1 + i] = (E @ T.T + T @ E.T)[lower]
            row += lower[0].size
        full = J.T @ AI @ J
        if not (np.all(np.isfinite(full)) and full[0, 0] > 0):
            return None
        return 2.0 * (full[1:, 1:] - np.outer(full[1:, 0], full[0, 1:]) / full[0, 0])

    def average_information(
        self,
        ev: Evaluation,
        beta: np.ndarray,
        u: np.ndarray,
        reml: bool,
        Zte: np.ndarray | None = None,
        b: np.ndarray | None = None,
    ) -> np.ndarray:
        """sigma^4 times the average information (Gilmour, Thompson & Cullis 1995) of the (RE)ML log-likelihood in
        psi: sigma^2, then each term's covariance entries (a, b), a >= b (np.tril_indices order), in the system's
        columns, at the evaluation `ev` (the factor's last) with its modes (beta, u); free of sigma's scale (AI
        itself would overflow at a sigma^2 of 1e180):

            AI_ab = y'P V_a P V_b P y / 2,   P y = e / sigma^2,   V_a P y = Z_t E_ab Z_t' e / sigma^2

        (e = y - X beta - Z b, E_ab the symmetric indicator of entry (a, b) at every level). Each w = V_a P y is
        known by its cross-products Z'w, X'w and Gram matrix, and w_a'P w_b is the penalized residual sum of
        squares of the fit to them: one half solve per entry of psi. `Zte`: Z'e and `b`: Lambda u, where the caller
        has them."""
        c, rc = self.cross, self.relcov
        factors = ev.factors
        if b is None:
            b = rc.apply(factors, u)
        if Zte is None:
            Zte = c.residual_products(beta, b)  # Z'e
        ee = ev.r2 - u @ u  # e'e
        sigma2 = ev.r2 / self.dof(reml)
        # per psi entry after sigma^2 a column: E_ab Z_t'e, in term t's columns
        Vj = np.zeros((rc.q, sum(len(lower_pairs(template.k)) for _, template in rc.blocks)))
        j = 0
        for (n, template), sl in zip(rc.blocks, rc.column_slices):
            k = template.k
            if k == 1:  # (a variance component: its column is Z_t'e)
                Vj[sl, j] = Zte[sl]
                j += 1
                continue
            v = Zte[sl].reshape(n, k)
            for a, bb in lower_pairs(k):
                block = np.zeros((n, k))
                block[:, a] = v[:, bb]
                block[:, bb] = v[:, a]
                Vj[sl, j] = block.ravel()
                j += 1
        GV = np.asarray(c.ZtZ @ Vj)
        m = Vj.shape[1]
        Zw = np.column_stack([Zte, GV])
        gram = np.empty((m + 1, m + 1))
        gram[0, 0] = ee
        gram[0, 1:] = gram[1:, 0] = Zte @ Vj
        gram[1:, 1:] = Vj.T @ GV
        Cu = self.half_solve(rc.apply_transpose(factors, Zw))
        quad = gram - Cu.T @ Cu
        if reml and c.p:
            Xw = np.column_stack([c.Xty - c.XtX @ beta - c.ZtX.T @ b, c.ZtX.T @ Vj])
            Cb = rx_transpose_solve(ev.RX, Xw - ev.RZX.T @ Cu)
            quad -= Cb.T @ Cb
        return 0.5 * quad / sigma2

    def _evaluate(
        self, theta: np.ndarray | None, factors: list[np.ndarray], refactor: bool = True, single: bool = False
    ) -> Evaluation:
        """`refactor=False`: the dense factor is at `factors` already (evaluation_at); `single`: see evaluate."""
        c = self.cross

        def infeasible(RZX=None, cu=None):
            # Lambda'Z'Z Lambda + I and X'V^{-1}X (X of full rank, checked before fitting) are positive definite at
            # every finite theta; rounding or overflow loses that only at theta so large that it is no candidate
            # optimum: no deviance, no solution.
            self._last_evaluation = None
            nan = np.nan
            return Evaluation(
                theta,
                np.inf,
                np.inf,
                np.full((self.relcov.q, c.p), nan) if RZX is None else RZX,
                np.full(self.relcov.q, nan) if cu is None else cu,
                np.full((c.p, c.p), nan),
                np.full(c.p, nan),
                nan,
                factors,
            )

        if isinstance(self._factor, DenseFactor):
            return self._evaluate_dense(theta, factors, infeasible, refactor)
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                factors = self._refactor(theta, factors, single)
            except (CholmodNotPositiveDefiniteError, la.LinAlgError, ValueError):
                self._factor_theta = self._factor_factors = None
                return infeasible()
            self.n_evaluations += 1
            rhs = self.relcov.apply_transpose(factors, np.column_stack([c.ZtX, c.Zty]))
            C = self._factor.half_solve(rhs)
        RZX, cu = C[:, : c.p], C[:, c.p]
        if not np.all(np.isfinite(C)):
            return infeasible(RZX, cu)
        parts = self._fixed_effect_parts(RZX.T @ RZX, RZX.T @ cu, float(cu @ cu))
        if parts is None:
            return infeasible(RZX, cu)
        RX, cbeta, logdet_RX2, r2 = parts
        logdet = float(self._factor.logdet())
        evaluation = Evaluation(theta, logdet, logdet_RX2, RZX, cu, RX, cbeta, r2, factors, self._factor_single)
        self._last_evaluation = evaluation
        return evaluation

    def _fixed_effect_parts(self, RZX_RZX: np.ndarray, RZX_cu: np.ndarray, cu_cu: float):
        """(R_X, c_beta, log |R_X|^2, r^2) from R_ZX'R_ZX, R_ZX'c_u and |c_u|^2, or None where X'V^{-1}X is not
        positive definite (lost to rounding)."""
        c = self.cross
        RX = np.zeros((0, 0))
        cbeta = np.zeros(0)
        logdet_RX2 = 0.0
        if c.p:
            # (LAPACK's potrf as it is: scipy's cholesky checks its argument, ~40 us a call, and the refinement of
            # the last term makes ~10 calls)
            RX, info = lapack.dpotrf(c.XtX - RZX_RZX, lower=0, clean=1)
            if info != 0 or not np.all(np.isfinite(RX)):
                return None
            cbeta = rx_transpose_solve(RX, c.Xty - RZX_cu)
            logdet_RX2 = 2.0 * float(np.sum(np.log(np.abs(np.diag(RX)))))
        return RX, cbeta, logdet_RX2, float(c.yty - cu_cu - cbeta @ cbeta)

    def refined_last_term(self, ev: Evaluation, reml: bool) -> Evaluation:
        """The evaluation with the last term's theta moved to its optimum with the others held (a small scalar term
        at the end of a Schur factor: the AI's steps converge on such a term only linearly), the factor moved with
        it; `ev` itself where that does not apply or gains nothing. ev must be the last evaluation.

        Changing one term's scale changes only L's rows of that term (trailing_rescaled): each trial costs a
        factorization of the term's block, not of S."""
        factor = self._factor
        count = self.relcov.column_counts[-1] if self.relcov.blocks else 0
        if (
            not isinstance(factor, SchurFactor)
            or not self.scorable
            or len(self.relcov.blocks) < 2
            or not 0 < count <= REFINED_TERM_MAX_COLUMNS
            or ev.theta is None
            or not ev.feasible
            or ev is not self._last_evaluation
            or not ev.theta[-1] > 0.0
        ):
            return ev
        block = factor.trailing_block(count)  # (InstEval's dept:service: a trial 0.1 ms against 12 for S)
        lead_cu, lead_RZX = ev.cu[:-count], ev.RZX[:-count]
        lead = (lead_RZX.T @ lead_RZX, lead_RZX.T @ lead_cu, float(lead_cu @ lead_cu))
        logdet_lead = ev.logdet_L2 - 2.0 * float(np.sum(np.log(np.diag(block))))

        def rescaled(ratio: float):  # (new block, trailing rows of R_ZX and c_u, fixed-effect parts) or None
            found = trailing_rescaled(block, ratio)
            if found is None:
                return None
            new_block, mapping = found
            RZX_t, cu_t = mapping @ ev.RZX[-count:], mapping @ ev.cu[-count:]
            parts = self._fixed_effect_parts(
                lead[0] + RZX_t.T @ RZX_t, lead[1] + RZX_t.T @ cu_t, lead[2] + float(cu_t @ cu_t)
            )
            return None if parts is None else (new_block, RZX_t, cu_t, parts)

        def deviance(log_ratio: float) -> float:
            found = rescaled(math.exp(log_ratio))
            if found is None:
                return np.inf
            block_t, parts = found[0], found[3]
            logdet = logdet_lead + 2.0 * float(np.sum(np.log(np.diag(block_t))))
            return self._deviance(logdet, parts[2], parts[3], reml)

        log_ratio = _newton_minimum(deviance)
        if log_ratio == 0.0:
            return ev
        ratio = math.exp(log_ratio)
        found = rescaled(ratio)
        if found is None:
            return ev
        new_block, RZX_t, cu_t, _ = found
        theta = ev.theta.copy()
        theta[-1] *= ratio
        factors = self.relcov.system_factors(theta)
        self._write_values(factors, term=len(factors) - 1)
        factor.rescale_trailing(count, ratio, new_block)
        RZX, cu = ev.RZX.copy(), ev.cu.copy()
        RZX[-count:], cu[-count:] = RZX_t, cu_t
        parts = self._fixed_effect_parts(RZX.T @ RZX, RZX.T @ cu, float(cu @ cu))
        assert parts is not None  # (rescaled found them at this ratio)
        RX, cbeta, logdet_RX2, r2 = parts
        refined = Evaluation(theta, float(factor.logdet()), logdet_RX2, RZX, cu, RX, cbeta, r2, factors, ev.single)
        self._factor_theta, self._factor_factors, self._last_evaluation = theta.copy(), factors, refined
        return refined

    def _refactor_dense(self, theta, factors) -> bool:
        """Refactor the DenseFactor at the templates `factors` (reporting as `theta`); False where LAPACK found
        the system not positive definite (the caller's evaluation is infeasible)."""
        if self._install_single_term(factors, True) is not None:
            self._factor_theta = None if theta is None else np.array(theta, dtype=float)
            return True
        try:
            self._factor.refactor(None, factors)
        except (la.LinAlgError, ValueError):
            self._factor_theta = self._factor_factors = None
            return False
        self._factor_theta = None if theta is None else np.array(theta, dtype=float)
        self._factor_factors = factors
        self.n_evaluations += 1
        return True

    def _evaluate_dense(self, theta, factors, infeasible, refactor: bool = True) -> Evaluation:
        """_evaluate's steps, all in DenseFactor's one factorization of the augmented matrix."""
        factor = self._factor
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if refactor and not self._refactor_dense(theta, factors):
                return infeasible()
            RZX, cu, RX, cbeta, r2, logdet_RX2 = factor.parts()
        if not factor.finite:  # overflow or rounding lost A + I's or X'V^{-1}X's positive definiteness
            return infeasible(RZX, cu)
        evaluation = Evaluation(theta, factor.logdet(), logdet_RX2, RZX, cu, RX, cbeta, r2, factors)
        self._last_evaluation = evaluation
        return evaluation

    def evaluation_at(self, theta) -> Evaluation:
        """The last evaluation if it was at theta (and the factor still is), else a new one: the solution at the
        optimum then costs no second factorization."""
        theta = np.asarray(theta, dtype=float)
        last = self._last_evaluation
        if (
            last is not None
            and last.theta is not None
            and self._factor_theta is not None
            and np.array_equal(last.theta, theta)
            and np.array_equal(self._factor_theta, theta)
            and not last.single
        ):
            return last
        return self.evaluate(theta)  # (which reuses a factor left at theta's templates)

    def dof(self, reml: bool) -> int:
        return self.cross.n - self.cross.p if reml else self.cross.n

    def deviance(self, theta, reml: bool) -> float:
        """-2 log-likelihood (ML) or -2 REML log-likelihood, with beta and sigma^2 profiled out."""
        return self.profiled_deviance(self.evaluate(theta), reml)

    def profiled_deviance(self, ev: Evaluation, reml: bool) -> float:
        if not ev.feasible:
            return np.inf
        return self._deviance(ev.logdet_L2, ev.logdet_RX2, ev.r2, reml)

    def _deviance(self, logdet_L2: float, logdet_RX2: float, r2: float, reml: bool) -> float:
        r2 = r2 if r2 > 0 else np.finfo(float).tiny  # an interpolating fit: r2 underflows, deviance -> -inf
        return float(
            profiled_deviance_value(logdet_L2, logdet_RX2, r2, self.dof(reml), self.cross.sum_log_weights, reml)
        )

    def deviance_at_sigma2(self, theta, sigma2: float, reml: bool) -> float:
        """The same criterion with sigma^2 given rather than profiled (beta still profiled)."""
        ev = self.evaluate(theta)
        if not ev.feasible:
            return np.inf
        nu = self.dof(reml)
        dev = ev.logdet_L2 + nu * (LOG_2PI + np.log(sigma2)) + ev.r2 / sigma2 - self.cross.sum_log_weights
        return float(dev + ev.logdet_RX2) if reml else float(dev)

    def solve(self, theta, reml: bool) -> Solution:
        """Fixed effects, conditional modes and sigma^2 at theta."""
        theta = np.asarray(theta, dtype=float)
        ev = self.evaluation_at(theta)
        if not ev.feasible:
            raise RankDeficientError(
                "the fixed effects are not estimable at this theta (X'V^{-1}X is numerically "
                "singular); check exog for collinear columns or refit from other start values"
            )
        beta_work, u = self.modes(ev)
        b = self.relcov.to_data_columns(self.relcov.apply(ev.factors, u))
        sigma2 = max(ev.r2, 0.0) / self.dof(reml)
        return Solution(theta, beta_work + self.cross.beta_ols, u, b, sigma2, self.profiled_deviance(ev, reml), ev)

    def solution_from(self, optimized: "PenalizedSystem", theta, reml: bool) -> Solution:
        """solve(theta) on the system the optimizer worked on (pipeline.optimized_system): this one, or its
        merged_system, whose solution has the same fixed effects, sigma^2 and deviance and is read off in this
        system's column order, without a factorization of this one. Its evaluation is then merged's: RX, cbeta, r^2
        and the log-determinants are the same in both, RZX and cu are merged's factor's."""
        solution = optimized.solve(theta, reml)
        if optimized is self:
            return solution
        _, order = self._merged
        back = np.empty_like(order)
        back[order] = np.arange(order.shape[0])
        return replace(solution, u=solution.u[back], b=solution.b[back])

    def modes(self, ev: Evaluation, also: np.ndarray | None = None):
        """beta (relative to cross.beta_ols) and the spherical conditional modes u at the evaluation's theta,
        which must be the factor's (the last evaluation); `also`: half_solve_t(also) in the same solve, third."""
        beta = np.zeros(0)
        if self.cross.p:  # LAPACK's trtrs as it is (scipy's solve_triangular checks its arguments: ~10 us a call)
            beta, info = lapack.dtrtrs(ev.RX, ev.cbeta)
            if info != 0:
                raise RankDeficientError("the fixed effects are not estimable at this theta (R_X is singular)")
        if also is None:
            return beta, self._factor.half_solve_t(ev.cu - ev.RZX @ beta)
        solved = self._factor.half_solve_t(np.column_stack([ev.cu - ev.RZX @ beta, also]))
        return beta, solved[:, 0], solved[:, 1:]

    def half_solve(self, B: np.ndarray) -> np.ndarray:
        """L^{-1} P B with the factor at the last evaluated theta."""
        return self._factor.half_solve(B)

    def half_solve_t(self, C: np.ndarray) -> np.ndarray:
        """P' L^{-T} C with the factor at the last evaluated theta: (A + I)^{-1} B = half_solve_t(half_solve(B))."""
        return self._factor.half_solve_t(C)

    @property
    def scalar_terms(self) -> bool:
        """Every term a scalar (one theta per term): a variance-components model."""
        return all(template.k == 1 for _, template in self.relcov.blocks)

    @property
    def scorable(self) -> bool:
        """Whether scoring.py's Newton steps can apply (supports_scoring: where the factor gives the traces): variance
        components of indicator columns only (the traces are those of the data's columns)."""
        return self.scalar_terms and not self.relcov.transformed

    @property
    def supports_scoring(self) -> bool:
        """Whether scoring.py's Newton steps apply: `scorable`, first term eliminated (the Schur form, or held dense
        with a scalar first term eliminated and terms after it)."""
        factor = self._factor
        return self.scorable and (
            isinstance(factor, SchurFactor) or (isinstance(factor, DenseFactor) and factor.scorable)
        )

    @property
    def single_precision_traces(self) -> bool:
        """Whether variance_traces offers single precision (the Schur form's large inverse; not a small dense one)."""
        return isinstance(self._factor, SchurFactor)

    def expect_scoring(self, wanted: bool = True) -> None:
        """Newton steps on the score (fit/scoring.py) follow: the factor forms what the score's traces need along with
        each refactorization from the first on, where it can (SchurFactor.expect_scoring); `wanted` False: no more
        scores (a last step checked by its deviance)."""
        expect = getattr(self._factor, "expect_scoring", None)
        if self.supports_scoring and expect is not None:
            expect(wanted)

    def variance_traces(self, theta, single: bool = False) -> np.ndarray | None:
        """tr(Z_j' (I + Z Lambda Lambda' Z')^{-1} Z_j) per term j at theta, for a variance-components model in
        the Schur form (see SchurFactor.variance_traces; `single`: its inverse in single precision); None where
        it is not available."""
        if not self.supports_scoring:
            return None
        return self._factor.variance_traces(self._factor_at(theta, single=True), single)

    def estimated_traces(self, theta, probes: int, corrected: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """variance_traces estimated at theta, with their standard errors (SchurFactor.estimated_traces; `corrected`:
        as the last inverse's traces plus the estimated change), or None where not offered."""
        estimate = getattr(self._factor, "estimated_traces", None)
        if not self.supports_scoring or estimate is None:
            return None
        return estimate(self._factor_at(theta, single=True), probes, corrected)

    def compiled_scoring(self, theta, reml: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """(score, average information) of fit/scoring.py's point at theta for variance components held dense
        (DenseFactor.compiled_scoring: one compiled pass); None where the factor does not offer it."""
        factor = self._factor
        if not (self.supports_scoring and isinstance(factor, DenseFactor)):
            return None
        theta = np.asarray(theta, dtype=float)
        self._factor_at(theta)
        return factor.compiled_scoring(theta, self.cross.n, reml, self.dof(reml))

    def conditional_covariance(self, theta, columns: np.ndarray) -> np.ndarray:
        """Lambda (Lambda'Z'Z Lambda + I)^{-1} Lambda' restricted to `columns` (times sigma^2 gives Var(b | y)).

        Only the selected columns are solved for, so the cost is len(columns) sparse solves.
        """
        factors = self._factor_at(theta)
        columns = np.asarray(columns, dtype=np.int64)
        E = np.zeros((self.relcov.q, columns.shape[0]))
        E[columns, np.arange(columns.shape[0])] = 1.0
        W = self._factor.solve(self.relcov.apply_transpose(factors, self.relcov.to_data_columns(E, transpose=True)))
        return self.relcov.to_data_columns(self.relcov.apply(factors, W))[columns]


def _sandwich(Tt: np.ndarray, blocks: np.ndarray, Ts: np.ndarray) -> np.ndarray:
    """Tt' B_m Ts for every block B_m (m, k_t, k_s), as two tall GEMMs: np.matmul over a million 1 x 2 blocks
    took 53 ms per evaluation on the 1,000,000-row random-slopes design."""
    m, kt, ks = blocks.shape
    right = (blocks.reshape(m * kt, ks) @ Ts).reshape(m, kt, ks)
    return (right.transpose(0, 2, 1).reshape(m * ks, kt) @ Tt).reshape(m, ks, kt).transpose(0, 2, 1)


def physical_memory() -> int:
    """Bytes of memory on this machine (a large fallback where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 * 2**30


def _clearly_linked(density: float, q2: int) -> bool:
    """Whether a first estimate of the linked share leaves no doubt that the block fills in (_schur_alone's tests,
    each passed twice over)."""
    return density >= 2 * SCHUR_ALONE_MIN_DENSITY or density * q2 >= 2 * SCHUR_ALONE_MIN_DEGREE


def _complement_density(ZtZ: sp.csc_matrix, q1: int, sample: int = 256, budget: float = 2e6, clear=None) -> float:
    """The share of the q2 x q2 block after the first q1 columns that eliminating those columns links, from the
    pattern of B = (Z'Z)_21 (q2 x q1): B_r B' on evenly spaced rows r, as many as `sample` or a work `budget` allows
    (on a 3,000 x 300 crossed design with 3.6M rows 256 rows took 0.4 s; at least 8 rows are used). Z'Z stores both
    triangles of a symmetric pattern, so B's rows are Z'Z's columns after q1 and B' is its first q1 columns read as
    the rows of a CSR: no row slice or conversion of the whole matrix (6.6 s at MovieLens size, with A's).
    `clear(density, q2)`: where an eighth of those rows already gives an answer it accepts, that is the answer
    (InstEval: 0.9 ms against 3.8; 0.218 against 0.212)."""
    ZtZ = sp.csc_matrix(ZtZ)
    ZtZ.sort_indices()
    q2 = ZtZ.shape[0] - q1
    end = int(ZtZ.indptr[q1])
    first_rows = ZtZ.indices[:end]
    Bt = sp.csr_matrix((np.ones(end), first_rows, ZtZ.indptr[: q1 + 1]), shape=(q1, ZtZ.shape[0]))  # [B_11' | B']
    in_rest = np.concatenate([[0], np.cumsum(first_rows >= q1)])
    per_column = in_rest[ZtZ.indptr[1 : q1 + 1]] - in_rest[ZtZ.indptr[:q1]]  # B's column sums
    rows = np.unique(np.linspace(0, q2 - 1, min(sample, q2)).astype(np.int64))
    sampled = sp.csr_matrix(ZtZ[:q1, q1 + rows].T)  # B's sampled rows
    sampled.data = np.ones_like(sampled.data)
    work = sampled @ per_column  # products B_r B' costs for each sampled row
    used = max(8, int(np.searchsorted(np.cumsum(work), budget)))
    if clear is not None and used >= 64:
        first = sampled[: min(used, rows.shape[0])][::8]
        density = (first @ Bt)[:, q1:].nnz / (first.shape[0] * q2)
        if clear(density, q2):
            return density
    used = min(used, rows.shape[0])
    return (sampled[:used] @ Bt)[:, q1:].nnz / (used * q2)


def _time_refactorization(factor, A, factors, time_to_beat: float = np.inf) -> float:
    """Seconds per refactorization: the least of TRIAL_REPEATS calls after the first (which allocates) where that
    took under TRIAL_REPEAT_MAX_SECONDS of CPU, else of one; or the first's where that is already twice
    `time_to_beat` and over TRIAL_REPEAT_MAX_SECONDS (the first call was within 10% of the second in every mode, on
    InstEval). A call descheduled by another process (its wall time far above its CPU time) decides nothing."""
    t0, cpu = time.perf_counter(), time.thread_time()
    factor.refactor(A, factors)
    first, first_cpu = time.perf_counter() - t0, time.thread_time() - cpu
    if min(first, first_cpu) > max(2 * time_to_beat, TRIAL_REPEAT_MAX_SECONDS):
        return first
    best = np.inf
    for _ in range(TRIAL_REPEATS if first_cpu < TRIAL_REPEAT_MAX_SECONDS else 1):
        t0 = time.perf_counter()
        factor.refactor(A, factors)
        best = min(best, time.perf_counter() - t0)
    return best


SCALAR_STRUCTURE_MAX_ENTRIES = 10_000_000


def _scalar_structure(ZtZ: sp.csc_matrix, relcov) -> tuple[list[_BlockPair], sp.csc_matrix] | None:
    """_block_structure where every term is scalar: A's pattern is then Z'Z's lower triangle, its entries in Z'Z's
    CSC order, each its own level pair (no grouping, slicing or sort: InstEval 3.8 -> ~1 ms). None where a term has
    slopes, Z'Z is not in canonical CSC form, a column lacks its diagonal entry (the general path adds those), or Z'Z
    holds more than SCALAR_STRUCTURE_MAX_ENTRIES (its per-entry temporaries, ~40 bytes an entry, would add to a
    large fit's peak: there the general path, measured at MovieLens size)."""
    if any(template.k != 1 for _, template in relcov.blocks) or not isinstance(ZtZ, sp.csc_matrix):
        return None
    if ZtZ.nnz > SCALAR_STRUCTURE_MAX_ENTRIES:
        return None
    if not ZtZ.has_canonical_format:
        return None
    q = ZtZ.shape[1]
    columns = np.repeat(np.arange(q), np.diff(ZtZ.indptr))
    lower = ZtZ.indices >= columns
    indices, columns = ZtZ.indices[lower], columns[lower]
    indptr = np.zeros(q + 1, dtype=ZtZ.indptr.dtype)
    np.cumsum(np.bincount(columns, minlength=q), out=indptr[1:])
    if np.any(indptr[:-1] == indptr[1:]) or np.any(indices[indptr[:-1]] != np.arange(q)):
        return None  # (a column's first lower entry is its diagonal one: sorted indices)
    values = ZtZ.data[lower]
    starts = np.asarray(relcov.column_starts)
    term_of_row = np.searchsorted(starts, indices, side="right") - 1
    term_of_column = np.searchsorted(starts, columns, side="right") - 1
    pair_of_entry = term_of_row * (term_of_row + 1) // 2 + term_of_column
    pairs = []
    for t in range(len(relcov.blocks)):
        for s in range(t + 1):
            positions = np.flatnonzero(pair_of_entry == t * (t + 1) // 2 + s)
            pairs.append(_BlockPair(t, s, values[positions][:, None, None], np.arange(positions.shape[0]), positions))
    return pairs, sp.csc_matrix((np.zeros(indices.shape[0]), indices, indptr), shape=ZtZ.shape)


def _pair_blocks(sub: sp.coo_matrix, t, s, n_t, k_t, n_s, k_s, row_offset, col_offset):
    """Group the entries of one term-pair block of Z'Z by level pair and say which products A stores."""
    a, i = np.divmod(sub.row.astype(np.int64), k_t)
    b, j = np.divmod(sub.col.astype(np.int64), k_s)
    vals = sub.data
    if k_t == k_s == 1 and (t != s or np.count_nonzero(a == b) == n_t):
        # scalar terms: each entry of Z'Z is its own level pair, and every level of a diagonal block has its
        # entry: no grouping needed (np.unique took 6 ms of InstEval's system)
        if t == s:
            lower = a >= b
            a, b, vals = a[lower], b[lower], vals[lower]
        return _PairTargets(t, s, vals[:, None, None], np.arange(a.shape[0]), row_offset + a, col_offset + b)
    if t == s:
        lower = a >= b  # the diagonal term block: keep level pairs on or below the diagonal
        a, b, i, j, vals = a[lower], b[lower], i[lower], j[lower], vals[lower]
        diag = np.arange(n_t, dtype=np.int64)  # every level's own block, even if Z'Z has no entry there
        key_all = np.concatenate([a * n_s + b, diag * n_s + diag])
    else:
        key_all = a * n_s + b
    keys, inverse = unique_inverse(key_all)  # (Z'Z's rows: sorted runs)
    inverse = inverse[: a.shape[0]]
    m = keys.shape[0]
    blocks = np.zeros((m, k_t, k_s))
    blocks[inverse, i, j] = vals
    la_, lb = np.divmod(keys, n_s)
    ii, jj = np.meshgrid(np.arange(k_t), np.arange(k_s), indexing="ij")
    rows = (row_offset + la_[:, None, None] * k_t + ii[None]).reshape(-1)
    cols = (col_offset + lb[:, None, None] * k_s + jj[None]).reshape(-1)
    keep = np.flatnonzero(rows >= cols) if t == s else np.arange(rows.shape[0])
    return _PairTargets(t, s, blocks, keep, rows[keep], cols[keep])


def _pattern_key(A: sp.csc_matrix, relcov) -> tuple:
    """What the trials' outcome depends on: A's pattern and the terms' layout."""
    return (
        A.shape,
        A.nnz,
        hash(A.indptr.tobytes()),
        hash(A.indices.tobytes()),
        tuple((n, template.k) for n, template in relcov.blocks),
    )


def _newton_minimum(f, start: float = 0.0) -> float:
    """A local minimum of the smooth f near `start` by Newton steps on central differences (each at most 1 long,
    halved until f falls); `start` where f is not convex there. (scipy.optimize's import alone costs ~0.2 s, more
    than a large fit gains from the refinement.)"""
    h = REFINED_DIFFERENCE_STEP
    x, fx = start, f(start)
    for _ in range(REFINED_MAX_STEPS):
        above, below = f(x + h), f(x - h)
        slope, curvature = (above - below) / (2.0 * h), (above - 2.0 * fx + below) / (h * h)
        if not (np.isfinite(slope) and np.isfinite(curvature) and curvature > 0.0):
            break
        step = min(max(-slope / curvature, -1.0), 1.0)
        if abs(step) < REFINED_TOLERANCE:
            break
        for _ in range(REFINED_MAX_STEPS):
            trial = f(x + step)
            if trial < fx:
                break
            step /= 2.0
        else:
            break
        x, fx = x + step, trial
    return x
