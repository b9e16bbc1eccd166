"""Compiled loops (numba) for the steps numpy and scipy cannot do at speed.

LevelBands.subtract: the Schur complement update of the first term, sum over its levels l of G_l H_l G_l'
(see SchurFactor), is a scatter of many small dense products into a dense q2 x q2 matrix: on a MovieLens-sized
design 4e9 products per evaluation. scipy's sparse product builds it as a sparse matrix (gigabytes there), and
CHOLMOD's factorization of it is far slower than this loop (docs/performance-scale.md, "MovieLens scale").

single_term_deviance_parts: a growth curve's evaluation (one k x k term, k > 1, level by level) and its gradient,
where numpy's batched k x k operations cost a few microseconds a call, tens of calls an evaluation.

dense_scalar_scoring: a scoring point of variance components held dense (crossed random intercepts), the same
algebra as fit/scoring.py's numpy path in one pass (~100 small-array calls a point there).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

__all__ = [
    "LevelBands",
    "dense_scalar_scoring",
    "level_sandwich",
    "level_moments",
    "many_single_term_hessian",
    "single_term_deviance_parts",
    "single_term_hessian",
    "subtract_gram_lower",
]

# S's rows in bands of equal numbers of entries: a tile (band x band) of S is written by one thread from the
# entries of both bands, level after level, so its writes stay in a part of S that fits the caches (popular
# rows get narrow bands). On a MovieLens-sized design the update took 4.1 s on two threads, against 10-12 s when
# each level's products were scattered over the whole of S (docs/performance-scale.md).
N_BANDS = 32

# dense_scalar_scoring and its helpers: sums may be reordered (vectorized: its loops are dot products of a few hundred
# terms, and the numpy path it stands in for sums in BLAS's own order; NaN and infinities keep their meaning, no 'fast'
# flags beyond), and divisions follow numpy's rules (inf or NaN where numba's default raises ZeroDivisionError)
_scoring_jit = njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")


class LevelBands:
    """The entries of G (one per level and row of S, sorted by level, then row) regrouped band by band for
    `subtract` and `pair_sum`: `order` is the permutation that callers apply to their per-entry arrays (rows,
    values) once.

    levels, rows: each entry's level (of n_levels) and row of S (of q2).
    """

    def __init__(self, levels: np.ndarray, rows: np.ndarray, n_levels: int, q2: int, n_bands: int = N_BANDS):
        cumulative = np.cumsum(np.bincount(rows, minlength=q2))
        inner = np.searchsorted(cumulative, np.arange(1, n_bands) * (cumulative[-1] / n_bands))
        edges = np.unique(np.concatenate([[0], inner, [q2]]))
        band = np.repeat(np.arange(edges.size - 1, dtype=np.int16), np.diff(edges))[rows]
        self.order = np.argsort(band, kind="stable")  # band by band; by level, then row within each
        n_bands = edges.size - 1
        counts = np.bincount(band.astype(np.int64) * n_levels + levels, minlength=n_bands * n_levels)
        counts = counts.reshape(n_bands, n_levels)
        # segments[t, l]: where level l's entries in band t start (band-major positions); segments[t, n_levels]: end
        self.segments = np.zeros((n_bands, n_levels + 1), dtype=np.int64)
        np.cumsum(counts, axis=1, out=self.segments[:, 1:])
        self.segments += np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])[:, None]
        upper, lower = np.tril_indices(n_bands)  # tiles on and below the diagonal: (row band, column band)
        c = counts.astype(float)
        work = (c @ c.T)[upper, lower]  # products per tile (times k^2)
        by_work = np.argsort(-work, kind="stable")
        self._tiles = np.column_stack([upper, lower])[by_work]
        self._work = work[by_work]
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _plan(self, n_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Tiles dealt to threads, the largest first to the least loaded: (tiles in thread order, each thread's
        range in it)."""
        if n_threads not in self._plans:
            loads = np.zeros(n_threads)
            owner = np.empty(self._work.size, dtype=np.int64)
            for i, w in enumerate(self._work):
                owner[i] = t = int(np.argmin(loads))
                loads[t] += w
            order = np.argsort(owner, kind="stable")
            ptr = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_threads))])
            self._plans[n_threads] = (np.ascontiguousarray(self._tiles[order]), ptr)
        return self._plans[n_threads]

    def subtract(
        self, rows: np.ndarray, g: np.ndarray, v: np.ndarray, out: np.ndarray, n_threads: int = 1, weights=None
    ) -> None:
        """out[rows[i], rows[j]] -= w_l g[i] . v[j] for every pair of one level l's entries with rows[j] <= rows[i]
        (the lower triangle), rows, g and v (m, k) in `order`, w_l = weights[l] (n_levels; default 1); out (q2, q2)
        C-contiguous float64, in place. With n_threads > 1, numba's threads share the tiles; with 1 no thread pool
        is involved at all (its idle threads slow the BLAS threads of the Cholesky that follows)."""
        self._visit_tiles(rows, g, v, weights, out, False, n_threads)

    def pair_sum(
        self, rows: np.ndarray, g: np.ndarray, v: np.ndarray, values: np.ndarray, n_threads: int = 1, weights=None
    ) -> float:
        """sum of w_l (g[i] . v[j]) values[rows[i], rows[j]] over the pairs `subtract` writes, both orders of a pair
        (i != j) counted: tr(values G H G') for symmetric `values` of which only the lower triangle is read (a
        trace without G H G' as a matrix: 2 GB at MovieLens size)."""
        return self._visit_tiles(rows, g, v, weights, values, True, n_threads)

    def _visit_tiles(self, rows, g, v, weights, matrix, read: bool, n_threads: int) -> float:
        n_threads = max(int(n_threads), 1)
        tiles, ptr = self._plan(n_threads)
        if g.ndim == 2 and g.shape[1] == 1:  # one number per entry for a scalar first term
            g, v = g[:, 0], v[:, 0]
        weights = np.ones(self.segments.shape[1] - 1) if weights is None else np.ascontiguousarray(weights, dtype=float)
        if n_threads == 1:
            return float(_tiles_serial(self.segments, tiles, rows, g, v, weights, matrix, read))
        sums = np.zeros(n_threads)
        _tiles_parallel(self.segments, tiles, ptr, rows, g, v, weights, matrix, read, sums)
        return float(sums.sum())


# The tiles' loops are specialised by the operands' types (g[i] v[j], or a dot product of k-vectors per entry)
# through an overload, and by a flag for what they do with a pair. Passing the product and the visit as jitted
# functions instead made numba's on-disk cache key hold dispatcher objects: a new compilation in every process,
# and at times a crash while saving it ("underlying object has vanished", numba/numba#2956, #9348).
def _product(g, v, i, j):
    """g[i] . v[j] (numba only)."""
    raise NotImplementedError


@overload(_product)
def _product_for(g, v, i, j):
    if g.ndim == 1:
        return lambda g, v, i, j: g[i] * v[j]

    def vector(g, v, i, j):
        s = 0.0
        for a in range(g.shape[1]):
            s += g[i, a] * v[j, a]
        return s

    return vector


@njit(cache=True, nogil=True)
def _tile(segments, row_band, column_band, rows, g, v, weights, matrix, read):
    """One tile: each level's entries in the row band against its entries in the column band (the pairs with
    rows[j] <= rows[i]), the level's products times its weight. `read` False: matrix[r, c] -= the pair's product
    (LevelBands.subtract); True: returns the sum of product * matrix[r, c], twice off the diagonal (pair_sum)."""
    starts_i, starts_j = segments[row_band], segments[column_band]
    diagonal = row_band == column_band
    total = 0.0
    for lvl in range(starts_i.shape[0] - 1):
        i0, i1 = starts_i[lvl], starts_i[lvl + 1]
        j0, j1 = starts_j[lvl], starts_j[lvl + 1]
        if i0 == i1 or j0 == j1:
            continue
        w = weights[lvl]
        for i in range(i0, i1):
            ri = rows[i]
            if read:
                for j in range(j0, i + 1 if diagonal else j1):
                    p = w * _product(g, v, i, j)
                    total += (p if j == i else 2.0 * p) * matrix[ri, rows[j]]
            else:
                for j in range(j0, i + 1 if diagonal else j1):
                    matrix[ri, rows[j]] -= w * _product(g, v, i, j)
    return total


@njit(cache=True, nogil=True)
def _tiles_serial(segments, tiles, rows, g, v, weights, matrix, read):
    total = 0.0
    for t in range(tiles.shape[0]):
        total += _tile(segments, tiles[t, 0], tiles[t, 1], rows, g, v, weights, matrix, read)
    return total


@njit(parallel=True, cache=True, nogil=True)
def _tiles_parallel(segments, tiles, ptr, rows, g, v, weights, matrix, read, sums):
    for thread in prange(ptr.shape[0] - 1):
        total = 0.0
        for t in range(ptr[thread], ptr[thread + 1]):
            total += _tile(segments, tiles[t, 0], tiles[t, 1], rows, g, v, weights, matrix, read)
        sums[thread] = total


@njit(cache=True, nogil=True)
def level_sandwich(levels, rows, g, h, U, out):
    """out += G diag(h) G' U, G (q2 x n_levels) given by its entries (levels[e], rows[e], g[e]) in any order, U and
    out (q2, c): two passes over the entries, c columns at a time (the probes of SchurFactor.estimated_traces)."""
    c = U.shape[1]
    T = np.zeros((h.shape[0], c))
    for e in range(levels.shape[0]):
        lvl, r, ge = levels[e], rows[e], g[e]
        for j in range(c):
            T[lvl, j] += ge * U[r, j]
    for e in range(levels.shape[0]):
        lvl, r = levels[e], rows[e]
        w = g[e] * h[lvl]
        for j in range(c):
            out[r, j] += w * T[lvl, j]


@njit(cache=True, nogil=True)
def single_term_deviance_parts(G11, G1R, GRR, T, rows, cols, reml, dof, gradient, L11, W, LS):
    """The profiled deviance's parts and exact gradient for one random-effects term (every column of Z in one
    k x k template T, eliminated level by level: DenseFactor with q2 = 0), in one pass over the levels.

    G11 (n, k, k): each level's Z'Z block; G1R (n, k, p + 1): its [Z'X, Z'y]; GRR (p + 1, p + 1): [X y]'[X y];
    rows, cols: T's entries in theta's order. Returns (status, log |L|^2, log |R_X|^2, r^2): status 0; 1 where a
    level's block or X'V^{-1}X is not positive definite or a value is not finite; 2 where r^2 is not in the
    factor (an interpolating fit: the caller's numpy path handles both). L11 (n, k, k) and LS (p + 1, p + 1), zeros,
    and W (n, k, p + 1) are filled with the factorization (DenseFactor's blocks). `gradient` (n_theta) is filled with
    core/gradient.py's single_term gradient, the same algebra per level: M_l = T'G_l T + I = L_l L_l',
    W_l = L_l^{-1} T'[Z'X Z'y]_l, S = GRR - sum W_l'W_l = LS LS'; with C = R_X^{-T} and
    Y_l = L_l^{-T} W_l[:, :p] C', G_l = (M_l^{-1} + Y_l Y_l') T'G_l - Y_l C X'Z_l (REML), and the modes
    u_l = L_l^{-T} W_l (-beta, 1)."""
    n, k = G11.shape[0], G11.shape[1]
    N2 = GRR.shape[0]
    p = N2 - 1
    S = GRR.copy()
    logdet1 = 0.0
    H = np.zeros((k, k))
    M = np.zeros((k, k))
    B = np.zeros((k, N2))
    for lvl in range(n):
        for i in range(k):  # H = G_l T, M = T'H + I, B = T'[Z'X Z'y]_l
            for b in range(k):
                s = 0.0
                for j in range(b, k):
                    s += G11[lvl, i, j] * T[j, b]
                H[i, b] = s
        for a in range(k):
            for b in range(k):
                s = 1.0 if a == b else 0.0
                for i in range(a, k):
                    s += T[i, a] * H[i, b]
                M[a, b] = s
            for c in range(N2):
                s = 0.0
                for i in range(a, k):
                    s += T[i, a] * G1R[lvl, i, c]
                B[a, c] = s
        L = L11[lvl]
        failed, logdet = _cholesky(M, L)
        if failed >= 0:
            return 1, 0.0, 0.0, 0.0
        logdet1 += logdet
        Wl = W[lvl]
        for a in range(k):  # W_l = L^{-1} B
            for c in range(N2):
                s = B[a, c]
                for m in range(a):
                    s -= L[a, m] * Wl[m, c]
                Wl[a, c] = s / L[a, a]
        for c in range(N2):  # S -= W_l'W_l (lower triangle)
            for d in range(c + 1):
                s = 0.0
                for a in range(k):
                    s += Wl[a, c] * Wl[a, d]
                S[c, d] -= s
    failed, _ = _cholesky(S, LS)
    if failed >= 0:
        return (2 if failed == p else 1), 0.0, 0.0, 0.0
    logdet_RX2 = 0.0
    for j in range(p):
        logdet_RX2 += 2.0 * np.log(LS[j, j])
    r2 = LS[p, p] * LS[p, p]
    Linv = np.zeros((N2, N2))
    _lower_inverse(LS, Linv)
    r = LS[p, p]
    ext = np.empty(N2)  # (-beta, 1): beta = -r Linv[p, :p]
    for c in range(p):
        ext[c] = r * Linv[p, c]
    ext[p] = 1.0
    Gsum = np.zeros((k, k))
    modes = np.zeros((k, k))
    Y = np.zeros((k, p))
    YC = np.zeros((k, p))
    u = np.zeros(k)
    w = np.zeros(k)
    Tu = np.zeros(k)
    P = np.zeros((k, k))
    G = np.zeros((k, k))
    Li = np.zeros((k, k))
    with_reml = reml and p > 0
    for lvl in range(n):
        _lower_inverse(L11[lvl], Li)
        Wl = W[lvl]
        for a in range(k):
            s = 0.0
            for c in range(N2):
                s += Wl[a, c] * ext[c]
            w[a] = s
        for a in range(k):  # u = Li' w; P = Li' Li
            s = 0.0
            for m in range(a, k):
                s += Li[m, a] * w[m]
            u[a] = s
            for b in range(k):
                s = 0.0
                for m in range(max(a, b), k):
                    s += Li[m, a] * Li[m, b]
                P[a, b] = s
        if with_reml:
            for a in range(k):  # Y = Li' (W_l[:, :p] C'), C = Linv[:p, :p] (lower)
                for c in range(p):
                    s = 0.0
                    for m in range(a, k):
                        t = 0.0
                        for e in range(c + 1):
                            t += Wl[m, e] * Linv[c, e]
                        s += Li[m, a] * t
                    Y[a, c] = s
            for a in range(k):
                for b in range(k):
                    s = 0.0
                    for c in range(p):
                        s += Y[a, c] * Y[b, c]
                    P[a, b] += s
                for c in range(p):  # YC = Y C
                    s = 0.0
                    for e in range(c, p):
                        s += Y[a, e] * Linv[e, c]
                    YC[a, c] = s
        for a in range(k):  # G = P T'G_l - YC X'Z_l (accumulated)
            for b in range(k):
                s = 0.0
                for m in range(k):
                    t = 0.0
                    for i in range(m, k):
                        t += T[i, m] * G11[lvl, i, b]
                    s += P[a, m] * t
                if with_reml:
                    for c in range(p):
                        s -= YC[a, c] * G1R[lvl, b, c]
                G[a, b] = s
                Gsum[a, b] += s
        for i in range(k):  # T u
            s = 0.0
            for j in range(i + 1):
                s += T[i, j] * u[j]
            Tu[i] = s
        for i in range(k):  # Z'e_l = Z'y_l - G_l T u - Z'X_l beta; modes += Z'e_l u'
            s = G1R[lvl, i, p]
            for j in range(k):
                s -= G11[lvl, i, j] * Tu[j]
            for c in range(p):
                s += G1R[lvl, i, c] * ext[c]
            for b in range(k):
                modes[i, b] += s * u[b]
    scale = dof / max(r2, 2.2250738585072014e-308)  # r^2 of an interpolating fit, as gradient.py takes it
    finite = np.isfinite(logdet1) and np.isfinite(logdet_RX2) and np.isfinite(r2)
    for t in range(rows.shape[0]):
        a, b = rows[t], cols[t]
        gradient[t] = 2.0 * Gsum[b, a] - 2.0 * scale * modes[a, b]
        finite = finite and np.isfinite(gradient[t])
    return (0 if finite else 1), logdet1, logdet_RX2, r2


@_scoring_jit
def _level_sum(a):
    """sum a (one contiguous loop; _scoring_jit reassociates it into vector lanes)."""
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i]
    return s


@_scoring_jit
def _level_dot(a, b):
    """sum a b."""
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@_scoring_jit
def _level_triple(a, b, c):
    """sum a b c."""
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i] * c[i]
    return s


@njit(cache=True, nogil=True)
def single_term_hessian(G11, G1R, GRR, T, rows, cols, pair_a, pair_b, second, reml, dof, gradient, hessian, parts):
    """The profiled deviance's exact gradient and Hessian in theta for one random-effects term (the layout of
    single_term_deviance_parts), by core/gradient.py's single_term_hessian algebra: per level D_l = Z_l'V^{-1}Z_l,
    C_l = Z_l'V^{-1}X (V^{-1} by Woodbury, T M_l^{-1} T'), then K = (X'V^{-1}X)^{-1}, beta, r^2 and w_l = Z_l'Py;
    the level sums of psi's pair products; psi's m x m gradient and Hessian (psi's entries (pair_a, pair_b), a >=
    b); theta's through psi's Jacobian and its constant second derivatives `second` (m, n_theta, n_theta).
    Fills `gradient`, `hessian` and `parts` (3): the deviance's (log |L|^2, log |R_X|^2, r^2), L L' = M_l's blocks and
    R_X'R_X = X'V^{-1}X; returns 0, or 1 where a block or X'V^{-1}X is not positive definite, 2 where r^2 <= 0."""
    n, k = G11.shape[0], G11.shape[1]
    p = GRR.shape[0] - 1
    D = np.empty((n, k, k))
    C = np.empty((n, k, p))
    cy = np.empty((n, k))
    XVX = np.empty((p, p))
    XVy = np.empty(p)
    for a in range(p):
        XVy[a] = GRR[a, p]
        for b in range(p):
            XVX[a, b] = GRR[a, b]
    yVy = GRR[p, p]
    GT = np.empty((k, k))
    M = np.empty((k, k))
    L = np.zeros((k, k))
    Li = np.zeros((k, k))
    A = np.empty((k, k))
    TMT = np.empty((k, k))
    Hl = np.empty((k, k))
    V1 = np.empty((k, p + 1))
    logdet_L = 0.0
    for lvl in range(n):
        G = G11[lvl]
        _product_into(G, T, GT)
        _product_into(T.T, GT, M)  # M = T'G T + I
        for a in range(k):
            M[a, a] += 1.0
        failed, logdet = _cholesky(M, L)
        if failed >= 0:
            return 1
        logdet_L += logdet
        _lower_inverse(L, Li)
        for a in range(k):  # A = T Li', TMT = A A' = T M^{-1} T'
            for m in range(k):
                s = 0.0
                for b in range(m + 1):
                    s += T[a, b] * Li[m, b]
                A[a, m] = s
        _product_into(A, A.T, TMT)
        _product_into(G, TMT, Hl)  # Hl = G TMT
        for a in range(k):  # D = G - Hl G
            for b in range(k):
                s = G[a, b]
                for m in range(k):
                    s -= Hl[a, m] * G[m, b]
                D[lvl, a, b] = s
        for a in range(k):  # C = ZX - Hl ZX, cy = Zy - Hl Zy; V1 = TMT [ZX Zy]
            for c in range(p + 1):
                s = G1R[lvl, a, c]
                t = 0.0
                for m in range(k):
                    s -= Hl[a, m] * G1R[lvl, m, c]
                    t += TMT[a, m] * G1R[lvl, m, c]
                V1[a, c] = t
                if c < p:
                    C[lvl, a, c] = s
                else:
                    cy[lvl, a] = s
        for c in range(p + 1):  # [X y]'V^{-1}[X y] -= [ZX Zy]' TMT [ZX Zy]
            for d in range(c, p + 1):
                s = 0.0
                for a in range(k):
                    s += G1R[lvl, a, c] * V1[a, d]
                if d < p:
                    XVX[c, d] -= s
                    if c != d:
                        XVX[d, c] -= s
                elif c < p:
                    XVy[c] -= s
                else:
                    yVy -= s
    LX = np.zeros((p, p))
    failed, logdet_RX2 = _cholesky(XVX, LX)
    if failed >= 0:
        return 1
    LXi = np.zeros((p, p))
    _lower_inverse(LX, LXi)
    K = np.empty((p, p))
    for a in range(p):
        for b in range(p):
            s = 0.0
            for m in range(max(a, b), p):
                s += LXi[m, a] * LXi[m, b]
            K[a, b] = s
    beta = np.empty(p)
    _product_into(K, XVy.reshape((p, 1)), beta.reshape((p, 1)))
    r2 = yVy
    for a in range(p):
        r2 -= XVy[a] * beta[a]
    if not r2 > 0.0:
        return 2
    parts[0], parts[1], parts[2] = logdet_L, logdet_RX2, r2
    with_reml = reml and p > 0
    # each level's D_l, B_l = C_l K C_l' (REML), w_l and C_l held level-last, then every sum over the levels below
    # as one contiguous loop (vectorized: _scoring_jit's reassociation)
    Dv = np.empty((k, k, n))
    Bv = np.zeros((k, k, n))
    wv = np.empty((k, n))
    Cv = np.empty((k, p, n))
    CK = np.empty((k, p))
    B = np.empty((k, k))
    for lvl in range(n):
        Dl, Cl = D[lvl], C[lvl]
        for a in range(k):
            s = cy[lvl, a]
            for c in range(p):
                s -= Cl[a, c] * beta[c]
                Cv[a, c, lvl] = Cl[a, c]
            wv[a, lvl] = s
            for b in range(k):
                Dv[a, b, lvl] = Dl[a, b]
        if with_reml:
            _product_into(Cl, K, CK)
            _product_into(CK, Cl.T, B)  # B = C K C'
            for a in range(k):
                for b in range(k):
                    Bv[a, b, lvl] = B[a, b]
    trace = np.zeros((k, k))  # sum (D_l - B_l) (ML: D_l)
    WW = np.zeros((k, k))
    Wd = np.zeros((k, k, k, k))  # [i, j, r, s] = sum w_i D_jr w_s
    DD = np.zeros((k, k, k, k))  # [i, j, r, s] = sum D_si D_jr, then minus DB and BD (REML)
    U = np.zeros((k, k, p))  # [i, j, q] = sum C_iq w_j
    CC = np.zeros((k, k, p, p))
    for i in range(k):
        for j in range(k):
            trace[i, j] = _level_sum(Dv[i, j]) - _level_sum(Bv[i, j])
            WW[i, j] = _level_dot(wv[i], wv[j])
            for c in range(p):
                U[i, j, c] = _level_dot(Cv[i, c], wv[j])
                if with_reml:
                    for d in range(p):
                        CC[i, j, c, d] = _level_dot(Cv[i, c], Cv[j, d])
            for r in range(k):
                for t in range(k):
                    Wd[i, j, r, t] = _level_triple(wv[i], Dv[j, r], wv[t])
                    v = _level_dot(Dv[t, i], Dv[j, r])
                    if with_reml:
                        v -= _level_dot(Dv[t, i], Bv[j, r]) + _level_dot(Bv[t, i], Dv[j, r])
                    DD[i, j, r, t] = v
    m = pair_a.shape[0]
    scale = dof / r2
    g_psi = np.empty(m)
    gw = np.empty(m)
    Ut = np.zeros((m, p))
    At = np.zeros((m, p, p))
    for t in range(m):
        a, b = pair_a[t], pair_b[t]
        tr = trace[a, b] + (trace[b, a] if a != b else 0.0)
        gw[t] = WW[a, b] + (WW[b, a] if a != b else 0.0)
        g_psi[t] = tr - scale * gw[t]
        for c in range(p):
            Ut[t, c] = U[a, b, c] + (U[b, a, c] if a != b else 0.0)
            if with_reml:
                for d in range(p):
                    At[t, c, d] = CC[a, b, c, d] + (CC[b, a, c, d] if a != b else 0.0)
    UK = np.empty((m, p))
    _product_into(Ut, K, UK)
    H_psi = np.empty((m, m))
    KA = np.empty((m, p, p))
    if with_reml:
        for t in range(m):
            _product_into(K, At[t], KA[t])
    for t in range(m):
        a, b = pair_a[t], pair_b[t]
        for u in range(m):
            c, d = pair_a[u], pair_b[u]
            first = 0.0
            wd = 0.0
            for e in range(2 if a != b else 1):  # (a, b) and (b, a): E_ab's entries
                i, j = (a, b) if e == 0 else (b, a)
                for f in range(2 if c != d else 1):
                    r, s_ = (c, d) if f == 0 else (d, c)
                    first += DD[i, j, r, s_]
                    wd += Wd[i, j, r, s_]
            if with_reml:
                for x in range(p):
                    for y in range(p):
                        first += KA[t, x, y] * KA[u, y, x]
            uku = 0.0
            for x in range(p):
                uku += UK[t, x] * Ut[u, x]
            H_psi[t, u] = scale * (2.0 * (wd - uku) - gw[t] * gw[u] / r2) - first
    nt = rows.shape[0]
    J = np.empty((m, nt))
    for t in range(m):
        a, b = pair_a[t], pair_b[t]
        for i in range(nt):
            v = 0.0
            if a == rows[i]:
                v += T[b, cols[i]]
            if b == rows[i]:
                v += T[a, cols[i]]
            J[t, i] = v
    for i in range(nt):
        s = 0.0
        for t in range(m):
            s += J[t, i] * g_psi[t]
        gradient[i] = s
    HJ = np.empty((m, nt))
    _product_into(H_psi, J, HJ)
    for i in range(nt):
        for j in range(nt):
            s = 0.0
            for t in range(m):
                s += J[t, i] * HJ[t, j] + g_psi[t] * second[t, i, j]
            hessian[i, j] = s
    return 0


@njit(cache=True, nogil=True)
def many_single_term_hessian(
    G11, G1R, GRR, Zty, Xty, yty, T, which, rows, cols, pair_a, pair_b, second, reml, dof, gradient, hessian, parts,
    status,
):  # fmt: skip
    """single_term_hessian at many (response, theta) points of one design: point i is response which[i] (its sums
    Zty[:, r] (q1 = n k, level-major), Xty[:, r], yty[r] in place of G1R's and GRR's last column) at the template
    T[i]. Fills gradient[i], hessian[i], parts[i] and status[i] as single_term_hessian does for one point: what
    a batched Newton step over many responses reads (fit/many.py), in one call where a call a point would cost
    more than the point."""
    n, k = G11.shape[0], G11.shape[1]
    p = GRR.shape[0] - 1
    G1Ry = G1R.copy()
    GRRy = GRR.copy()
    for i in range(which.shape[0]):
        r = which[i]
        for lvl in range(n):
            for a in range(k):
                G1Ry[lvl, a, p] = Zty[lvl * k + a, r]
        for a in range(p):
            GRRy[a, p] = GRRy[p, a] = Xty[a, r]
        GRRy[p, p] = yty[r]
        status[i] = single_term_hessian(
            G11, G1Ry, GRRy, T[i], rows, cols, pair_a, pair_b, second, reml, dof, gradient[i], hessian[i], parts[i]
        )


@_scoring_jit
def dense_scalar_scoring(root, W, LS, g11, G1R, GRR, theta, column_term, r2, n_rows, reml, dof, score, information):
    """fit/scoring.py's score and average information for variance components held dense (DenseFactor, a scalar
    first term eliminated level by level, scalar terms after it), from the factorization at theta, in one pass:
    the same algebra as scoring_point's numpy path (its modes, Z'e, traces of (A + I)^{-1} per term, their REML
    corrections, and PenalizedSystem.average_information), whose ~100 small-array calls cost most of a point.

    root (n1): sqrt(1 + theta_1^2 G_ll); W (n1, N2), LS (N2, N2, lower): DenseFactor's blocks; g11 (n1), G1R (n1,
    N2), GRR (N2, N2): its cross-products [Z_2 X y] against the first term's levels and each other; theta (m): the
    first term's, then the rest's (column_term: each rest column's term, 0-based among them); r2: the factor's r^2;
    n_rows: n. Fills score (m + 1) and information ((m + 1) x (m + 1)), both in psi = sigma^2 (1, theta^2), and
    returns False where a theta is zero."""
    n1 = root.shape[0]
    N2 = LS.shape[0]
    p = N2 - column_term.shape[0] - 1
    q2 = N2 - p - 1
    q = n1 + q2
    m = theta.shape[0]
    y = N2 - 1
    for t in range(m):
        if theta[t] == 0.0:
            return False
    lam = np.empty(q)  # Lambda's diagonal, and each column's term
    term = np.empty(q, dtype=np.int64)
    for r in range(n1):
        lam[r] = theta[0]
        term[r] = 0
    for c in range(q2):
        lam[n1 + c] = theta[1 + column_term[c]]
        term[n1 + c] = 1 + column_term[c]
    # beta: R_X beta = c_beta, R_X[i, j] = LS[q2 + j, q2 + i] (upper)
    beta = np.empty(p)
    for i in range(p - 1, -1, -1):
        s = LS[y, q2 + i]
        for j in range(i + 1, p):
            s -= LS[q2 + j, q2 + i] * beta[j]
        beta[i] = s / LS[q2 + i, q2 + i]
    # u = L^{-T} (c_u - R_ZX beta); b = Lambda u
    rhs = np.empty((q, 1))
    for r in range(n1):
        s = W[r, y]
        for j in range(p):
            s -= W[r, q2 + j] * beta[j]
        rhs[r, 0] = s
    for c in range(q2):
        s = LS[y, c]
        for j in range(p):
            s -= LS[q2 + j, c] * beta[j]
        rhs[n1 + c, 0] = s
    u = _dense_half_solve_t(root, W, LS, q2, rhs)
    b = np.empty(q)
    uu = 0.0
    for r in range(q):
        b[r] = lam[r] * u[r, 0]
        uu += u[r, 0] * u[r, 0]
    # Z'e = Z'y - Z'X beta - Z'Z b
    Zb = _ztz_times(g11, G1R, GRR, n1, q2, b.reshape(q, 1))
    Zte = np.empty(q)
    for r in range(q):
        s = _zt_column(G1R, GRR, n1, r, y)
        for j in range(p):
            s -= _zt_column(G1R, GRR, n1, r, q2 + j) * beta[j]
        Zte[r] = s - Zb[r, 0]
    ee = r2 - uu
    sigma2 = r2 / dof
    # traces of (A + I)^{-1} per term: the first term's by its levels, the rest's by the inverse of L22
    L22inv = np.zeros((q2, q2))
    _lower_inverse(LS[:q2, :q2], L22inv)
    traces = np.zeros(m)
    # |L22^{-1} Lambda_2 G' diag(1 / m)|_F^2 (G: Z_2'Z_1), its rows summed as axpys over the levels
    scaled = np.empty((q2, n1))
    for lvl in range(n1):
        scale = 1.0 / (root[lvl] * root[lvl])
        traces[0] += g11[lvl] * scale
        for d in range(q2):
            scaled[d, lvl] = G1R[lvl, d] * lam[n1 + d] * scale
    row = np.empty(n1)
    for c in range(q2):
        row[:] = 0.0
        for d in range(c + 1):
            coefficient = L22inv[c, d]
            for lvl in range(n1):
                row[lvl] += coefficient * scaled[d, lvl]
        for lvl in range(n1):
            traces[0] -= row[lvl] * row[lvl]
    for c in range(q2):
        s = 0.0
        for r in range(c, q2):
            s += L22inv[r, c] * L22inv[r, c]
        t = term[n1 + c]
        traces[t] += (1.0 - s) / (lam[n1 + c] * lam[n1 + c])
    trace_P = float(n_rows)
    for t in range(m):
        trace_P -= traces[t] * theta[t] * theta[t]
    if reml and p > 0:
        # C = L^{-T} R_ZX, CR = C R_X^{-1}: tr(P) loses p - |CR|^2; T = Z'X - Z'Z Lambda C, TR = T R_X^{-1}: each
        # term's trace loses its rows' |TR|^2
        RZX = np.empty((q, p))
        for j in range(p):
            for r in range(n1):
                RZX[r, j] = W[r, q2 + j]
            for c in range(q2):
                RZX[n1 + c, j] = LS[q2 + j, c]
        C = _dense_half_solve_t(root, W, LS, q2, RZX)
        CR = C.copy()
        _times_rx_inverse(LS, q2, p, CR)
        s = 0.0
        for r in range(q):
            for j in range(p):
                s += CR[r, j] * CR[r, j]
        trace_P -= p - s
        for r in range(q):
            for j in range(p):
                C[r, j] *= lam[r]
        T = _ztz_times(g11, G1R, GRR, n1, q2, C)
        for r in range(q):
            for j in range(p):
                T[r, j] = _zt_column(G1R, GRR, n1, r, q2 + j) - T[r, j]
        _times_rx_inverse(LS, q2, p, T)
        for r in range(q):
            s = 0.0
            for j in range(p):
                s += T[r, j] * T[r, j]
            traces[term[r]] -= s
    v2 = np.zeros(m)
    for r in range(q):
        v2[term[r]] += Zte[r] * Zte[r]
    # (divided by sigma^2 in turn, as the numpy path does: sigma^4 and sigma^6 of a response near 1e-100 underflow)
    score[0] = -0.5 * (trace_P / sigma2 - ee / sigma2 / sigma2)
    for t in range(m):
        score[1 + t] = -0.5 * (traces[t] / sigma2 - v2[t] / sigma2 / sigma2)
    # the average information (PenalizedSystem.average_information): w_0 = e, w_t = Z_t Z_t'e, known by Z'w, X'w and
    # their Gram matrix; w_a'P w_b is the penalized residual sum of squares of their fit
    masked = np.zeros((q, m + 1))  # Z'e by terms, after a zero column for e itself
    for r in range(q):
        masked[r, 1 + term[r]] = Zte[r]
    Zw = _ztz_times(g11, G1R, GRR, n1, q2, masked)
    for r in range(q):
        Zw[r, 0] = Zte[r]
    gram = np.empty((m + 1, m + 1))
    gram[0, 0] = ee
    for t in range(m):
        gram[0, 1 + t] = gram[1 + t, 0] = v2[t]
    for s_ in range(m):
        for t in range(m):
            s = 0.0
            for r in range(q):
                if term[r] == s_:
                    s += Zte[r] * Zw[r, 1 + t]
            gram[1 + s_, 1 + t] = s
    for r in range(q):  # Lambda' Z'w, then L^{-1} of it
        for a in range(m + 1):
            Zw[r, a] *= lam[r]
    Cu = _dense_half_solve(root, W, LS, q2, Zw)
    for a in range(m + 1):
        for c in range(a + 1):
            s = 0.0
            for r in range(q):
                s += Cu[r, a] * Cu[r, c]
            gram[a, c] -= s
            if c != a:
                gram[c, a] -= s
    if reml and p > 0:
        Xw = np.empty((m + 1, p))  # (X'w less R_ZX' Cu)', a row per w
        for i in range(p):
            s = GRR[q2 + i, y]
            for j in range(p):
                s -= GRR[q2 + i, q2 + j] * beta[j]
            for r in range(q):
                s -= _zt_column(G1R, GRR, n1, r, q2 + i) * b[r]
            Xw[0, i] = s
            for t in range(m):
                s = 0.0
                for r in range(q):
                    if term[r] == t:
                        s += _zt_column(G1R, GRR, n1, r, q2 + i) * Zte[r]
                Xw[1 + t, i] = s
            for a in range(m + 1):  # less R_ZX' Cu
                s = 0.0
                for r in range(n1):
                    s += W[r, q2 + i] * Cu[r, a]
                for c in range(q2):
                    s += LS[q2 + i, c] * Cu[n1 + c, a]
                Xw[a, i] -= s
        _times_rx_inverse(LS, q2, p, Xw)  # Cb' = (R_X^{-T} (...))'
        for a in range(m + 1):
            for c in range(m + 1):
                s = 0.0
                for i in range(p):
                    s += Xw[a, i] * Xw[c, i]
                gram[a, c] -= s
    for a in range(m + 1):
        for c in range(m + 1):
            information[a, c] = 0.5 * gram[a, c] / sigma2 / sigma2 / sigma2
    return True


@_scoring_jit
def _zt_column(G1R, GRR, n1, r, column):
    """Row r of Z'[Z_2 X y] (r a column of Z) at `column` of [Z_2 X y] (the first term's own block is diagonal)."""
    if r < n1:
        return G1R[r, column]
    return GRR[r - n1, column]


@_scoring_jit
def _ztz_times(g11, G1R, GRR, n1, q2, V):
    """Z'Z V (V: q x k) for the layout of dense_scalar_scoring, in one pass over the first term's rows."""
    k = V.shape[1]
    out = np.zeros((n1 + q2, k))
    for r in range(n1):
        for a in range(k):
            out[r, a] = g11[r] * V[r, a]
        for c in range(q2):
            g = G1R[r, c]
            for a in range(k):
                out[r, a] += g * V[n1 + c, a]
                out[n1 + c, a] += g * V[r, a]
    for c in range(q2):
        for d in range(q2):
            g = GRR[c, d]
            for a in range(k):
                out[n1 + c, a] += g * V[n1 + d, a]
    return out


@_scoring_jit
def _dense_half_solve_t(root, W, LS, q2, B):
    """L^{-T} B (DenseFactor.half_solve_t with a scalar first term): L22' first, then the first term's levels."""
    n1 = root.shape[0]
    out = np.empty(B.shape)
    for a in range(B.shape[1]):
        for c in range(q2 - 1, -1, -1):
            s = B[n1 + c, a]
            for r in range(c + 1, q2):
                s -= LS[r, c] * out[n1 + r, a]
            out[n1 + c, a] = s / LS[c, c]
        for lvl in range(n1):
            s = B[lvl, a]
            for c in range(q2):
                s -= W[lvl, c] * out[n1 + c, a]
            out[lvl, a] = s / root[lvl]
    return out


@_scoring_jit
def _dense_half_solve(root, W, LS, q2, B):
    """L^{-1} B (DenseFactor.half_solve with a scalar first term): the first term's levels, then L22."""
    n1 = root.shape[0]
    out = np.empty(B.shape)
    for a in range(B.shape[1]):
        for lvl in range(n1):
            out[lvl, a] = B[lvl, a] / root[lvl]
        for c in range(q2):
            s = B[n1 + c, a]
            for lvl in range(n1):
                s -= W[lvl, c] * out[lvl, a]
            for d in range(c):
                s -= LS[c, d] * out[n1 + d, a]
            out[n1 + c, a] = s / LS[c, c]
    return out


@_scoring_jit
def _times_rx_inverse(LS, q2, p, M):
    """M <- M R_X^{-1} in place, R_X[i, j] = LS[q2 + j, q2 + i] (upper): each row solved against R_X' (lower)."""
    for r in range(M.shape[0]):
        for i in range(p):
            s = M[r, i]
            for j in range(i):
                s -= LS[q2 + i, q2 + j] * M[r, j]
            M[r, i] = s / LS[q2 + i, q2 + i]


@njit(cache=True, nogil=True)
def level_moments(codes, V, r, X, n1, between, sampling, stacked, sums):
    """fit/pilot.moment_start's pass over the rows and levels in one call (its numpy path: some 25 small-array calls):
    each level l's least-squares fit of the residuals r on its own columns V (n x k), b_l = G_l^{-1}
    V_l'r_l (G_l = V_l'V_l), on the levels with more than k rows and G_l's smallest eigenvalue above 1e-10 of its
    largest ("usable"). Fills `between` (k x k: the usable levels' coefficients' centred cross-products),
    `sampling` (k x k: sigma^2, the residual sum of squares over its degrees of freedom, times the mean of their
    G_l^{-1}), `stacked`'s first m k rows (G_l^{-1} V_l'X_l of each usable level,
    stacked: _fixed_share's matrix) and `sums` (4): the residual sum of squares, its degrees of freedom (sum of
    rows less k), max |G_l^{-1} - G_0^{-1}| and max |G_0^{-1}| (the first usable level's). Returns m, the number of
    usable levels. codes (n): each row's level, 0 <= code < n1."""
    n, k = V.shape
    p = X.shape[1]
    counts = np.zeros(n1, dtype=np.int64)
    gram = np.zeros((n1, k, k))
    cross = np.zeros((n1, k))
    squares = np.zeros(n1)
    crossX = np.zeros((n1, k, p))
    for i in range(n):
        lvl = codes[i]
        counts[lvl] += 1
        squares[lvl] += r[i] * r[i]
        for a in range(k):
            va = V[i, a]
            cross[lvl, a] += va * r[i]
            for b in range(a + 1):
                gram[lvl, a, b] += va * V[i, b]
            for j in range(p):
                crossX[lvl, a, j] += va * X[i, j]
    inverse = np.empty((k, k))
    first = np.empty((k, k))
    coefficients = np.empty((n1, k))
    mean = np.zeros(k)
    mean_inverse = np.zeros((k, k))
    m = 0
    residual = 0.0
    df = 0
    spread = 0.0
    for lvl in range(n1):
        G = gram[lvl]
        for a in range(k):
            for b in range(a):
                G[b, a] = G[a, b]
        if counts[lvl] <= k:
            continue
        if k == 2:  # (closed form, as the numpy path's)
            centre, half = (G[0, 0] + G[1, 1]) / 2, (G[0, 0] - G[1, 1]) / 2
            radius = np.sqrt(half * half + G[0, 1] * G[1, 0])
            smallest, largest = centre - radius, centre + radius
        else:
            eigenvalues = np.linalg.eigvalsh(G)
            smallest, largest = eigenvalues[0], eigenvalues[-1]
        if not smallest > 1e-10 * max(largest, 1e-300):
            continue
        if k == 2:
            det = G[0, 0] * G[1, 1] - G[0, 1] * G[1, 0]
            inverse[0, 0], inverse[1, 1] = G[1, 1] / det, G[0, 0] / det
            inverse[0, 1], inverse[1, 0] = -G[0, 1] / det, -G[1, 0] / det
        else:
            inverse[:, :] = np.linalg.inv(G)
        if m == 0:
            first[:, :] = inverse
        fit = 0.0
        for a in range(k):
            s = 0.0
            for b in range(k):
                s += inverse[a, b] * cross[lvl, b]
                mean_inverse[a, b] += inverse[a, b]
                spread = max(spread, abs(inverse[a, b] - first[a, b]))
            coefficients[m, a] = s
            mean[a] += s
            fit += s * cross[lvl, a]
            for j in range(p):
                t = 0.0
                for b in range(k):
                    t += inverse[a, b] * crossX[lvl, b, j]
                stacked[m * k + a, j] = t
        residual += squares[lvl] - fit
        df += counts[lvl] - k
        m += 1
    if m == 0:
        return 0
    for a in range(k):
        mean[a] /= m
    sigma2 = residual / df
    for a in range(k):
        for b in range(k):
            s = 0.0
            for lvl in range(m):
                s += (coefficients[lvl, a] - mean[a]) * (coefficients[lvl, b] - mean[b])
            between[a, b] = s
            sampling[a, b] = sigma2 * mean_inverse[a, b] / m
    top = 0.0
    for a in range(k):
        for b in range(k):
            top = max(top, abs(first[a, b]))
    sums[0], sums[1], sums[2], sums[3] = residual, df, spread, top
    return m


@njit(cache=True, nogil=True)
def _product_into(A, B, out):
    """out = A B for small matrices (loops: numpy's product costs more per call than these flops)."""
    for i in range(A.shape[0]):
        for j in range(B.shape[1]):
            s = 0.0
            for m in range(A.shape[1]):
                s += A[i, m] * B[m, j]
            out[i, j] = s


@njit(cache=True, nogil=True)
def _cholesky(M, L):
    """L L' = M from M's lower triangle, into L: (-1, log |M|), or (the first pivot that is not positive, 0)."""
    n = M.shape[0]
    logdet = 0.0
    for j in range(n):
        d = M[j, j]
        for m in range(j):
            d -= L[j, m] * L[j, m]
        if not d > 0.0:
            return j, 0.0
        L[j, j] = np.sqrt(d)
        logdet += np.log(d)
        for i in range(j + 1, n):
            s = M[i, j]
            for m in range(j):
                s -= L[i, m] * L[j, m]
            L[i, j] = s / L[j, j]
    return -1, logdet


@njit(cache=True, nogil=True)
def _lower_inverse(L, out):
    """out = L^{-1} for lower-triangular L (its upper triangle left as it is: zero), by forward substitution."""
    k = L.shape[0]
    for j in range(k):
        out[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, k):
            s = 0.0
            for m in range(j, i):
                s += L[i, m] * out[m, j]
            out[i, j] = -s / L[i, i]


def subtract_gram_lower(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out, n_threads: int = 1) -> None:
    """out[a, b] -= sum_s W[s, a] W[s, b] for b <= a (see _gram_rows); with n_threads > 1, numba's threads share
    the rows of out."""
    if n_threads > 1:
        _gram_parallel(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out)
    else:
        _gram_rows(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out, 0, col_ptr.shape[0] - 1)


@njit(parallel=True, cache=True, nogil=True)
def _gram_parallel(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out):
    n_cols = col_ptr.shape[0] - 1
    for a in prange(n_cols):
        _gram_rows(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out, a, a + 1)


@njit(cache=True, nogil=True)
def _gram_rows(col_ptr, col_rows, col_pos, row_ptr, row_cols, values, out, first, last):
    """out[a, b] -= sum_s W[s, a] W[s, b] for b <= a: the lower triangle of W'W subtracted, W sparse (s x columns)
    given once by rows (row_ptr, row_cols sorted within each row, values: CSR) and once by columns (col_ptr,
    col_rows, col_pos: each entry's position in `values`). Row a of out is written by one thread from column a's
    entries and their rows' entries up to a: the writes stay in one row (a level-by-level scatter wrote
    all over out: 0.12 s against this one's ~0.03 s for 1,000,000 entries of
    20,000 x 2,000)."""
    for a in range(first, last):
        for e in range(col_ptr[a], col_ptr[a + 1]):
            s = col_rows[e]
            wa = values[col_pos[e]]
            for f in range(row_ptr[s], row_ptr[s + 1]):
                b = row_cols[f]
                if b > a:
                    break
                out[a, b] -= wa * values[f]
