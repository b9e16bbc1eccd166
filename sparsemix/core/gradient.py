"""The exact gradient of the profiled deviance in theta, for every covariance template, from a dense factor.

With Lambda linear in theta (each entry theta_i sits at template positions (a, b), repeated per level: E_i =
dLambda / dtheta_i), M = Lambda' Z'Z Lambda + I = L L', and Omega the leading (q + p) block of the augmented
system [[M, Lambda' Z'X], [., X'X]] (log |Omega| = log |L|^2 + log |R_X|^2):

    d log |M| / dtheta_i     = 2 tr(M^{-1} B E_i),                 B = Lambda' Z'Z
    d log |Omega| / dtheta_i = 2 tr(G E_i),    G = (M^{-1} + Y Y') B - Y R_X^{-T} X'Z,   Y = L^{-T} R_ZX R_X^{-1}
    d r^2 / dtheta_i         = -2 e'Z E_i u                        (envelope theorem; e = y - X beta - Z Lambda u)

and the deviance, log |M| + n log r^2 (ML) or log |Omega| + (n - p) log r^2 (REML) plus constants, has gradient
d log|.| + (dof / r^2) d r^2. Each trace reads only the diagonal k x k blocks of G. DenseFactor's L is
[[L11, 0], [L21, L22]] with L11 block diagonal (the first term, eliminated level by level) and L22 of order
q2 <= DENSE_MAX_ORDER, so those blocks cost O(q1 q2^2 + q2^3), never a q x q inverse (ProfiledGradient). In the
Schur form (large crossed designs) the same blocks come from S^{-1} and the pair map (SchurGradient).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from . import compiled

__all__ = ["ProfiledGradient", "SchurGradient", "level_pair_products"]

_TINY = float(np.finfo(float).tiny)  # r^2 of an interpolating fit, as the deviance takes it (system.py)


class ProfiledGradient:
    """d deviance / d theta for one system held dense (a DenseFactor), at the factor's last refactorization."""

    def __init__(self, factor, cross, relcov):
        self.factor, self.cross, self.relcov = factor, cross, relcov
        # every term scalar and none eliminated (variance components held whole): each entry's traces are sums of
        # G's diagonal over its term's columns (compact reads only that diagonal)
        self._scalar_terms = factor.q1 == 0 and all(template.k == 1 for _, template in relcov.blocks)
        self._membership = relcov.membership
        # (the tables below are built on first use: a variance-components fit of one or two Newton steps reads
        # none of them, and building them all cost 35-65 us, 2-3% of such a fit)

    @functools.cached_property
    def _rest(self):  # Lambda_2: the terms after the eliminated one
        return self.relcov.__class__(self.relcov.blocks[self.factor.first :])

    @functools.cached_property
    def _ZtZ22(self) -> np.ndarray:
        return self.factor.GRR[: self.factor.q2, : self.factor.q2]

    @functools.cached_property
    def _ZtZ12(self) -> np.ndarray:
        f = self.factor
        return f.G1R[:, :, : f.q2].reshape(f.q1, f.q2)

    @functools.cached_property
    def _XtZ(self) -> np.ndarray:
        return np.ascontiguousarray(self.cross.ZtX.T)

    @functools.cached_property
    def _ZtX3(self) -> np.ndarray:  # the first term's, per level
        f = self.factor
        return self.cross.ZtX[: f.q1].reshape(f.n1, f.k1, self.cross.p)

    @functools.cached_property
    def _Zty3(self) -> np.ndarray:
        f = self.factor
        return self.cross.Zty[: f.q1].reshape(f.n1, f.k1, 1)

    @functools.cached_property
    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(first, transposed, straight, starts): the first term's template positions (2 x its entries), and for
        each theta entry of the rest's terms the flat positions (b, a) of G's rest block and (a, b) of Ze u' over
        the term's levels, concatenated; entry i's sum is np.add.reduceat at starts[i]."""
        f, relcov = self.factor, self.relcov
        transposed: list[np.ndarray] = []
        straight: list[np.ndarray] = []
        starts: list[int] = []
        first = np.zeros((2, 0), dtype=np.intp)
        for j, ((n, template), cols) in enumerate(zip(relcov.blocks, relcov.column_slices)):
            positions = np.array(template.positions, dtype=np.intp).reshape(-1, 2).T
            if j < f.first:
                first = positions
                continue
            base = cols.start - f.q1 + np.arange(n)[:, None] * template.k  # each level's first row, in the rest
            for a, b in positions.T:
                rows, columns = (base + a).ravel(), (base + b).ravel()
                starts.append(sum(len(t) for t in transposed))
                transposed.append(columns * f.q2 + rows)
                straight.append(rows * f.q2 + columns)
        empty = np.zeros(0, dtype=np.intp)
        return (
            first,
            np.concatenate(transposed) if transposed else empty,
            np.concatenate(straight) if straight else empty,
            np.array(starts, dtype=np.intp),
        )

    @property
    def _first_positions(self) -> np.ndarray:
        return self._entries[0]

    @functools.cached_property
    def _psi(self) -> "_PsiIndex":  # one k x k term: single_term_hessian's index tables
        template = self.relcov.blocks[0][1]
        return psi_index(template.k, template.positions)

    @functools.cached_property
    def _templates_tables(self):
        """_templates_hessian's tables (terms with templates held whole): (per-term psi indices, their offsets, S,
        trace rows, trace columns, trace starts). psi is quadratic in theta, psi_x = theta'S_x theta / 2: S (m x
        n_theta x n_theta) is its second derivative and S theta its Jacobian. tr(M_ll E_ab) summed over term x's
        levels l, for symmetric M: the sum of M's entries (a, b) and (b, a) of every level, at (rows, columns),
        x's from starts[x] on."""
        relcov = self.relcov
        term_psi = [psi_index(template.k, template.positions) for _, template in relcov.blocks]
        sizes = [index.a.size for index in term_psi]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.intp)
        m, n_theta = int(offsets[-1]), relcov.n_theta
        second = np.zeros((m, n_theta, n_theta))
        trace_rows, trace_cols = [], []
        for t, ((n, template), cols, th, index) in enumerate(
            zip(relcov.blocks, relcov.column_slices, relcov.theta_slices, term_psi)
        ):
            second[offsets[t] : offsets[t + 1], th, th] = index.second
            first = cols.start + np.arange(n) * template.k  # each level's first column
            for a, b in zip(index.a, index.b):
                pairs = [(a, b)] if a == b else [(a, b), (b, a)]
                trace_rows.append(np.concatenate([first + i for i, _ in pairs]))
                trace_cols.append(np.concatenate([first + j for _, j in pairs]))
        starts = np.cumsum([0] + [r.size for r in trace_rows[:-1]]).astype(np.intp)
        return term_psi, offsets, second, np.concatenate(trace_rows), np.concatenate(trace_cols), starts

    def compact(self, factors, reml: bool, dof: int) -> np.ndarray | None:
        """The gradient at the factor's last refactorization where nothing is eliminated (q1 = 0: LS is the whole
        augmented factor): one inverse of LS gives u and beta from its last row ((-u, -beta, 1) / r) and Omega's
        inverse from its leading block; the refactorization's half product Lambda' Sigma (Sigma = [Z X y]'[Z X y])
        gives B and Z'e. None where r^2 was not in LS (an interpolating fit)."""
        parts = self._compact_parts(reml, dof)
        if parts is None:
            return None
        head, half, Ze, modes, scale = parts
        m, q = head.shape[0], self.relcov.q
        if self._scalar_terms:  # G's diagonal only, per term: 2 tr(G E_j) - 2 scale e'Z E_j u
            diagonal = np.einsum("ij,ij->j", head[:, :q], head @ half[:m])
            return 2.0 * ((diagonal - scale * Ze * modes) @ self._membership)
        G = head[:, :q].T @ (head @ half[:m])
        return self._combine(np.zeros((0, 1, 1)), G, Ze, modes, scale)

    def _compact_parts(self, reml: bool, dof: int):
        """For compact and compact_hessian: Omega's (REML) or L's (ML) inverse factor `head` (m x m), the half product
        Lambda' Sigma's columns of Z (`half`), Z'e, u, and dof / r^2; None where r^2 was not in LS."""
        f, q, p = self.factor, self.relcov.q, self.cross.p
        LS = f.LS
        r = LS[-1, -1]
        if r <= 0:
            return None
        Linv, info = lapack.dtrtri(LS, lower=1)  # LS's upper triangle is 0, and so is Linv's
        if info != 0:
            return None
        last = -r * Linv[-1]  # (u, beta, -1)
        m = q + p if reml and p else q
        half = f.half[:, :q]  # Lambda' Z'Z over X'Z over y'Z
        Ze = -(half.T @ last)
        return Linv[:m, :m], half, Ze, last[:q], dof / max(f.r2, _TINY)

    def compact_hessian(self, theta: np.ndarray, reml: bool, dof: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The gradient and the exact Hessian in theta (the optimizer's coordinates, at which the factor was last
        refactorized) where nothing is eliminated (the system held whole); terms with templates:
        _templates_hessian. Where every term is scalar (variance components), in tau = theta^2 (V = I + sum tau_j
        Z_j Z_j', P the REML projection, Q = Z'PZ, R = Z'V^{-1}Z, w = Z'Py = Z'e, s_j = |w_j|^2, sums over term blocks):

            d / dtau_j             = tr(R_jj) - dof s_j / r^2                       (REML: Q for R)
            d^2 / dtau_j dtau_k    = -|R_jk|_F^2 + dof (2 w_j'Q_jk w_k / r^2 - s_j s_k / r^4)

        with Z'PZ = Z'Z - F'F, F = Omega^{-1/2} [Lambda Z'Z; X'Z] (Henderson's equations), and Z'V^{-1}Z from F's
        first q rows; then H_theta = 4 theta theta' * H_tau + 2 diag(g_tau). None where r^2 was not in LS."""
        if self.factor.q1:
            return None
        parts = self._compact_parts(True, dof)  # Omega's inverse factor: Q for both criteria
        if parts is None:
            return None
        head, half, w, _, scale = parts
        q = self.relcov.q
        F = head @ half[: head.shape[0]]
        ZtZ = self.factor.GRR[:q, :q]
        Q = ZtZ - F.T @ F
        R = Q if reml or head.shape[0] == q else ZtZ - F[:q].T @ F[:q]
        if not self._scalar_terms:
            return self._templates_hessian(theta, Q, R, w, scale, dof)
        E = self._membership  # (q, terms): a block's sum of M is E' M E
        Ew = E * w[:, None]
        s = w @ Ew
        g_tau = np.diagonal(R) @ E - scale * s
        H_tau = scale * (2.0 * (Ew.T @ Q @ Ew) - s[:, None] * s * (scale / dof)) - E.T @ (R * R) @ E
        H = (4.0 * theta[:, None] * theta) * H_tau
        H.flat[:: theta.size + 1] += 2.0 * g_tau
        return 2.0 * theta * g_tau, H

    def _templates_hessian(self, theta, Q, R, w, scale, dof) -> tuple[np.ndarray, np.ndarray]:
        """compact_hessian for terms with templates (k x k), held whole: in psi (each term's entries of Sigma_t =
        T_t T_t'), for terms t, s with levels l, m and E_ab the symmetric indicator,

            d / dpsi_t,ab = sum_l tr(R_ll E_ab) - dof/r^2 sum_l w_l'E_ab w_l
            d^2 / dpsi_t,ab dpsi_s,cd = -sum_lm tr(R_lm E_cd R_ml E_ab)
                + dof (2 sum_lm w_l'E_ab Q_lm E_cd w_m / r^2 - (sum w'E_ab w)(sum w'E_cd w) / r^4)

        (R_lm, Q_lm: k_t x k_s blocks), each term pair's sums by one Gram product of R's blocks (_psi_hessian)."""
        _, _, _, rows, cols, _ = self._templates_tables
        return self._psi_hessian(theta, R[rows, cols], w, scale, dof, lambda a, b: (R[a, b], Q[a, b]))

    def _psi_hessian(self, theta, traces, w, scale, dof, blocks, first=None) -> tuple[np.ndarray, np.ndarray]:
        """_templates_hessian's sums, from R's entries at the trace positions (`traces`: R[rows, cols] of
        _templates_tables), Z'e (`w`) and the blocks of R and Q of two terms' columns (`blocks(rows, columns)`:
        slices), or, for the first term with itself, its products (P, Y) as given (`first`: eliminated_hessian's);
        then theta's by psi's Jacobian (S theta) and its second derivatives S."""
        rc = self.relcov
        term_psi, offsets, second, rows, cols, starts = self._templates_tables
        gw = np.add.reduceat(w[rows] * w[cols], starts)
        g_psi = np.add.reduceat(traces, starts) - scale * gw
        H_psi = np.outer(gw, gw) * (-scale * scale / dof)
        terms = list(zip(rc.blocks, rc.column_slices, term_psi))
        for t, ((nt, tt), slt, it) in enumerate(terms):
            kt, Wt = tt.k, w[slt].reshape(nt, tt.k)
            for s in range(t + 1):
                (ns, ts), sls, is_ = terms[s]
                ks, Ws = ts.k, w[sls].reshape(ns, ts.k)
                if first is not None and t == 0:
                    P, Y = first
                else:
                    R_ts, Q_ts = blocks(slt, sls)
                    P = level_pair_products(R_ts, nt, kt, ns, ks).transpose(2, 0, 1, 3).reshape(kt * kt, ks * ks)
                    Y = (Wt.T @ Q_ts.reshape(nt, kt * ns * ks)).reshape(kt * kt, ns, ks)  # [i j, m, r]
                    Y = np.matmul(Y.transpose(0, 2, 1), Ws).reshape(kt * kt, ks * ks)  # [i j, r s]
                block = it.select @ (scale * 2.0 * Y - P) @ is_.select.T
                H_psi[offsets[t] : offsets[t + 1], offsets[s] : offsets[s + 1]] += block
                if s != t:
                    H_psi[offsets[s] : offsets[s + 1], offsets[t] : offsets[t + 1]] += block.T
        J = second @ theta
        n_theta = theta.size  # (g_psi's weighting of S as one product: np.tensordot's wrapper cost 20 us a call)
        return J.T @ g_psi, J.T @ H_psi @ J + (g_psi @ second.reshape(g_psi.size, -1)).reshape(n_theta, n_theta)

    def _residual_products(self, factors, beta: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Z'e, e = y - X beta - Z Lambda u (beta relative to cross.beta_ols), from the cross-products: Z'Z by blocks,
        the first term's per level where it is eliminated."""
        f, c = self.factor, self.cross
        q1, q2 = f.q1, f.q2
        v = self.relcov.apply(factors, u)  # Lambda u
        ZtZv = np.empty(q1 + q2)
        ZtZv[q1:] = self._ZtZ22 @ v[q1:]
        if q1:
            ZtZv[q1:] += self._ZtZ12.T @ v[:q1]
            ZtZv[:q1] = np.matmul(f.G11, v[:q1].reshape(f.n1, f.k1, 1)).reshape(q1) + self._ZtZ12 @ v[q1:]
        return c.Zty - ZtZv - c.ZtX @ beta

    def eliminated_hessian(self, theta, factors, beta, u, reml: bool, dof: int) -> tuple[np.ndarray, np.ndarray]:
        """The gradient and the exact Hessian in theta (the optimizer's coordinates; `factors` its templates, at
        which the factor was last refactorized; beta and u the modes there) where the first term is eliminated level
        by level beside the terms after it (q1, q2 > 0): _templates_hessian's sums without a q x q matrix. With
        Omega's factor [[L11, 0], [W', LS]] (W: q1 x (q2 + p), LS: (q2 + p) lower), Henderson's Z'PZ = Z'Z - F'F
        has F = [F_top; F_bot], F_top = L11^{-1} Lambda_1' [Z_1'Z_1 | Z_1'Z_2] per level ([Phi_l | Psi_l]) and
        F_bot = LS^{-1} ([Lambda_2' Z_2'Z; X'Z] - W'F_top) (h = q2 + p rows; Z'V^{-1}Z, ML's R, the first q2 of them).
        So the first term's block is D - H H' (D block diagonal: Z_l'Z_l - Phi_l'Phi_l; H = F_bot's first-term
        columns, transposed), whose level-pair sums reduce to h x h products:

            sum_lm R_lm[i,r] R_lm[j,s] = sum_l (D_l[i,r] (D_l - C_l)[j,s] - C_l[i,r] D_l[j,s])
                                         + sum_ab O[i,a,j,b] O[r,a,s,b]

        with C_l = H_l H_l' and O[i,a,j,b] = sum_l H_l[i,a] H_l[j,b]; the blocks beside the other terms are formed
        (q1 x q2)."""
        f, c = self.factor, self.cross
        n1, k, q1, q2, p = f.n1, f.k1, f.q1, f.q2, c.p
        h = q2 + p
        rest = factors[f.first :]
        A = _lower_inverses(f.L11) @ factors[0].T  # L11_l^{-1} T1'
        Phi = A @ f.G11  # (n1, k, k)
        G12, G22 = self._ZtZ12, self._ZtZ22  # (q1 x q2: G12's copy out of G1R kept, not made three times a call)
        Psi = np.matmul(A, G12.reshape(n1, k, q2))  # (n1, k, q2)
        Wh = f.W[:, :h]
        first_rows = np.matmul(Wh.reshape(n1, k, h).transpose(0, 2, 1), Phi).transpose(1, 0, 2).reshape(h, q1)
        right = np.empty((h, q1 + q2))
        right[:q2, :q1] = self._rest.apply_transpose(rest, G12.T)
        right[:q2, q1:] = self._rest.apply_transpose(rest, G22)
        right[q2:, :q1] = f.G1R[:, :, q2 : q2 + p].reshape(q1, p).T
        right[q2:, q1:] = f.GRR[q2 : q2 + p, :q2]
        right[:, :q1] -= first_rows
        right[:, q1:] -= Wh.T @ Psi.reshape(q1, q2)
        inverse, _ = lapack.dtrtri(f.LS[:h, :h], lower=1)  # (then a product: trtrs took twice as long at h = 102)
        F = np.tril(inverse) @ right  # F_bot (h x q)
        D = f.G11 - np.matmul(Phi.transpose(0, 2, 1), Phi)
        G12_rest = G12 - np.matmul(Phi.transpose(0, 2, 1), Psi).reshape(q1, q2)
        G22_rest = G22 - Psi.reshape(q1, q2).T @ Psi.reshape(q1, q2)

        def parts(rows):  # R or Q from F_bot's first `rows` rows: the first term's H, its blocks' diagonal, Q_12, Q_22
            F1, F2 = F[:rows, :q1], F[:rows, q1:]
            H = np.ascontiguousarray(F1.T).reshape(n1, k, rows)
            C = np.matmul(H, H.transpose(0, 2, 1))
            return H, C, G12_rest - F1.T @ F2, G22_rest - F2.T @ F2

        HQ, CQ, Q12, Q22 = parts(h)
        HR, CR, R12, R22 = (HQ, CQ, Q12, Q22) if reml or p == 0 else parts(q2)
        w = self._residual_products(factors, beta, u)  # Z'e at the modes
        # the first term with itself: P [j i, r s] and Y [i j, r s] as _psi_hessian forms them from explicit blocks
        O = HR.reshape(n1, k * HR.shape[2])
        O = (O.T @ O).reshape(k, -1, k, HR.shape[2]).transpose(0, 2, 1, 3).reshape(k * k, -1)  # [i j, a b]
        PP = np.einsum("lir,ljs->irjs", D, D - CR) - np.einsum("lir,ljs->irjs", CR, D)
        PP += (O @ O.T).reshape(k, k, k, k).transpose(0, 2, 1, 3)  # [i j, r s] -> [i r, j s]
        P = PP.transpose(2, 0, 1, 3).reshape(k * k, k * k)
        w1 = w[:q1].reshape(n1, k)
        Zq = np.einsum("li,lja->ija", w1, HQ).reshape(k * k, h)
        Y = (w1.T @ (D[:, :, :, None] * w1[:, None, None, :]).reshape(n1, -1)).reshape(k, k, k, k)  # sum_l w D w
        Y -= (Zq @ Zq.T).reshape(k, k, k, k).transpose(0, 1, 3, 2)
        # R's entries at the trace positions: the first term's from its diagonal blocks D - C, the others' from R22
        _, _, _, rows, cols, _ = self._templates_tables
        traces = np.empty(rows.size)
        inside = rows < q1
        traces[inside] = (D - CR).reshape(-1)[(rows[inside] // k) * k * k + (rows[inside] % k) * k + cols[inside] % k]
        traces[~inside] = R22[rows[~inside] - q1, cols[~inside] - q1]

        def blocks(a, b):  # (a: a later term's columns; b: the first term's, or a later term's)
            a = slice(a.start - q1, a.stop - q1)
            if b.start < q1:
                return R12[:, a].T, Q12[:, a].T
            b = slice(b.start - q1, b.stop - q1)
            return R22[a, b], Q22[a, b]

        scale = dof / max(f.r2, _TINY)
        return self._psi_hessian(theta, traces, w, scale, dof, blocks, (P, Y.reshape(k * k, k * k)))

    def single_term(self, factors, reml: bool, dof: int) -> np.ndarray | None:
        """The gradient at the factor's last refactorization where the eliminated first term is all there is (q2 = 0:
        one term with many levels, a growth curve's): M is block diagonal, so everything is per level, k x k.
        With C = R_X^{-T} (LS's inverse's leading block: LS = [[R_X', 0], [c_beta', r]]) and Y_l = L_l^{-T} R_ZX,l
        C', the blocks are G_l = (M_l^{-1} + Y_l Y_l') B_l - Y_l C X'Z_l. None where r^2 was not in LS."""
        f, p = self.factor, self.cross.p
        n, k = f.n1, f.k1
        LS = f.LS
        r = LS[-1, -1]
        if r <= 0:
            return None
        Linv, info = lapack.dtrtri(LS, lower=1)
        if info != 0:
            return None
        beta = -r * Linv[-1, :p]
        W3 = f.W.reshape(n, k, p + 1)
        L11inv = _lower_inverses(f.L11)
        L11inv_t = L11inv.transpose(0, 2, 1)
        u3 = np.matmul(L11inv_t, W3 @ np.append(-beta, 1.0)[:, None])  # L^{-T} (c_u - R_ZX beta), (n, k, 1)
        T = factors[0]
        B11 = np.matmul(T.T, f.G11)  # Lambda' Z'Z, per level
        P = np.matmul(L11inv_t, L11inv)  # M^{-1}, per level
        ZtX3 = self._ZtX3
        if reml and p:
            C = np.tril(Linv[:p, :p])
            Y3 = np.matmul(L11inv_t, W3[:, :, :p] @ C.T)
            P = P + np.matmul(Y3, Y3.transpose(0, 2, 1))
            G = np.matmul(P, B11) - np.matmul(Y3 @ C, ZtX3.transpose(0, 2, 1))
        else:
            G = np.matmul(P, B11)
        Ze = self._Zty3 - np.matmul(f.G11, np.matmul(T, u3)) - ZtX3 @ beta[:, None]  # Z'e, (n, k, 1)
        modes = Ze[:, :, 0].T @ u3[:, :, 0]
        a, b = self._first_positions
        return 2.0 * G.sum(axis=0)[b, a] - 2.0 * (dof / max(f.r2, _TINY)) * modes[a, b]

    def single_term_hessian(self, factors, reml: bool, dof: int) -> tuple[np.ndarray, np.ndarray, tuple] | None:
        """The gradient and the exact Hessian in theta where one k x k term is all there is (q2 = 0), at the
        templates `factors`, from the cross-products alone (level l: G_l = Z_l'Z_l, Z_l'X, Z_l'y), in one compiled
        pass (kernels.single_term_hessian). In psi, the entries (a >= b) of Sigma = T T' (V = I + sum_l Z_l Sigma
        Z_l', E_ab its symmetric indicator):

            D_l = Z_l'V^{-1}Z_l,  C_l = Z_l'V^{-1}X,  K = (X'V^{-1}X)^{-1},  w_l = Z_l'Py,  B_l = C_l K C_l'
            Z_l'PZ_m = D_l [l = m] - C_l K C_m'
            d / dpsi_ab = sum_l tr((D_l - B_l) E_ab) - dof/r^2 sum_l w_l'E_ab w_l          (ML: D_l alone)
            d^2 / dpsi_ab dpsi_cd = -sum_lm tr(Z_l'PZ_m E_ab Z_m'PZ_l E_cd)                (ML: D_l's terms alone)
                + dof (2 sum_lm w_l'E_ab Z_l'PZ_m E_cd w_m / r^2 - (sum w'E_ab w)(sum w'E_cd w) / r^4)

        the sums over level pairs reduced by K to p x p ones (sum_m C_m'E_ab C_m); then to theta by psi's Jacobian
        (E_i T' + T E_i') and its second derivatives. (gradient, Hessian, (log |L|^2, log |R_X|^2, r^2): the
        deviance's parts from the same pass), or None where the kernel cannot (not positive definite, r^2 <= 0, no
        fixed effects)."""
        f, index = self.factor, self._psi
        if self.cross.p == 0:
            return None
        single_term_hessian = compiled.kernel("single_term_hessian")
        if single_term_hessian is None:  # being compiled: the optimizer goes on from the gradient
            return None
        n_theta = index.rows.size
        gradient, hessian, parts = np.empty(n_theta), np.empty((n_theta, n_theta)), np.empty(3)
        status = single_term_hessian(
            f.G11, f.G1R, f.GRR, np.ascontiguousarray(factors[0], dtype=float), index.rows, index.cols,
            index.a, index.b, index.second, reml, dof, gradient, hessian, parts,
        )  # fmt: skip
        return (gradient, hessian, (float(parts[0]), float(parts[1]), float(parts[2]))) if status == 0 else None

    def scalar_term_hessian(self, factors, reml: bool, dof: int) -> tuple[np.ndarray, np.ndarray, tuple] | None:
        """single_term_hessian for a scalar term (k = 1: a random intercept alone), in numpy from the cross-products
        (no compiled kernel to load). With psi = t^2, level l's d_l = 1 + psi g_l (g_l = Z_l'Z_l), D_l = g_l / d_l,
        C_l = Z_l'X / d_l, w_l = Z_l'r / d_l (r = y - X beta-hat), K = (X'V^{-1}X)^{-1}, B_l = C_l K C_l',
        S = C'C and u = C'w:

            dD/dpsi = sum (D - B) - dof sum w^2 / r^2                                          (ML: B = 0)
            d2D/dpsi2 = -(sum D^2 - 2 sum D B + tr(K S K S)) + dof (2 (sum D w^2 - u'K u) / r^2 - (sum w^2)^2 / r^4)

        (ML: sum D^2 alone in the first part); then to t by dpsi/dt = 2t. (gradient, Hessian, (log |L|^2, log |R_X|^2,
        r^2): the deviance's parts, sum log d_l, log |X'V^{-1}X| and r^2), or None where X'V^{-1}X is not positive
        definite or r^2 <= 0."""
        f, p = self.factor, self.cross.p
        t = float(factors[0][0, 0])
        psi = t * t
        g = f.G11[:, 0, 0]
        c, z = f.G1R[:, 0, :p], f.G1R[:, 0, p]
        d = 1.0 + psi * g
        D = g / d
        C = c / d[:, None]
        XtVX = f.GRR[:p, :p] - psi * (c.T @ C)
        XtVy = f.GRR[:p, p] - psi * (C.T @ z)
        yVy = f.GRR[p, p] - psi * float(z @ (z / d))
        logdet_RX2 = 0.0
        if p:
            root, info = lapack.dpotrf(XtVX, lower=1)
            if info != 0:
                return None
            logdet_RX2 = 2.0 * float(np.log(np.diagonal(root)).sum())
            K, info = lapack.dpotri(root, lower=1)
            K = np.tril(K) + np.tril(K, -1).T
            beta = K @ XtVy
        else:
            K, beta = np.zeros((0, 0)), np.zeros(0)
        r2 = float(yVy - beta @ XtVy)
        if not r2 > 0:
            return None
        w = (z - c @ beta) / d
        ww = float(w @ w)
        CK = C @ K
        B = np.einsum("ij,ij->i", CK, C) if reml else np.zeros_like(D)
        gradient_psi = float(np.sum(D - B)) - dof * ww / r2
        trace = float(D @ D)
        if reml and p:
            S = C.T @ C
            KS = K @ S
            trace += -2.0 * float(D @ B) + float(np.sum(KS * KS.T))
        u = C.T @ w
        quadratic = float((D * w) @ w) - float(u @ K @ u)
        hessian_psi = -trace + dof * (2.0 * quadratic / r2 - ww * ww / (r2 * r2))
        gradient = np.array([2.0 * t * gradient_psi])
        parts = (float(np.log(d).sum()), logdet_RX2, r2)
        return gradient, np.array([[4.0 * psi * hessian_psi + 2.0 * gradient_psi]]), parts

    def single_term_compiled(self, factors, reml: bool, dof: int):
        """single_term's gradient with the factorization it reads, in one compiled pass over the levels
        (core/kernels.py: 10-50 us where numpy's batched k x k operations took 130-300 us on lme4's growth-curve
        models). (log |L|^2, log |R_X|^2, r^2, gradient, (L11, W, LS): the factorization's blocks, for
        DenseFactor.install), or None where the numpy path must decide (not positive definite, r^2 not in the factor,
        a value not finite)."""
        kernel = compiled.kernel("single_term_deviance_parts")
        if kernel is None:  # being compiled (core/compiled.py): the numpy path meanwhile
            return None
        f = self.factor
        gradient = np.empty(self.relcov.n_theta)
        a, b = self._first_positions
        N2 = f.GRR.shape[0]
        blocks = (np.zeros((f.n1, f.k1, f.k1)), np.empty((f.n1, f.k1, N2)), np.zeros((N2, N2)))
        status, logdet, logdet_RX2, r2 = kernel(f.G11, f.G1R, f.GRR, factors[0], a, b, reml, dof, gradient, *blocks)
        if status != 0:
            return None
        return logdet, logdet_RX2, r2, gradient, blocks

    def __call__(self, ev, beta: np.ndarray, u: np.ndarray, reml: bool, dof: int) -> np.ndarray:
        """The gradient at evaluation `ev` (the factor's last: its templates, R_ZX, R_X, r^2), with beta
        (relative to cross.beta_ols) and u the conditional modes there."""
        f, c, relcov = self.factor, self.cross, self.relcov
        n1, k1, q1, q2, p = f.n1, f.k1, f.q1, f.q2, c.p
        factors = ev.factors
        first = q1 > 0
        T1 = factors[0] if first else np.eye(1)

        L22inv, info = lapack.dtrtri(f.LS[:q2, :q2], lower=1) if q2 else (np.zeros((0, 0)), 0)
        if info != 0:
            return np.full(relcov.n_theta, np.nan)
        L22inv = np.tril(L22inv)
        Minv22 = L22inv.T @ L22inv
        B22 = self._rest.apply_transpose(factors[f.first :], self._ZtZ22)  # Lambda_2' (Z'Z)_22
        if first:
            # L^{-1}'s block Linv21 = -L22^{-1} L21 L11^{-1}; M^{-1}'s first-term diagonal blocks D and rows Minv21
            L11inv = _lower_inverses(f.L11)
            L21 = f.W[:, :q2].T.reshape(q2, n1, k1)
            Linv21 = -L22inv @ np.matmul(L21.transpose(1, 0, 2), L11inv).transpose(1, 0, 2).reshape(q2, q1)
            Minv21 = L22inv.T @ Linv21
            Linv21_3 = Linv21.reshape(q2, n1, k1)
            D = np.matmul(L11inv.transpose(0, 2, 1), L11inv) + np.einsum("jla,jlc->lac", Linv21_3, Linv21_3)
            B11 = np.matmul(T1.T, f.G11)  # Lambda_1' (Z'Z)_11, per level
            B12 = np.matmul(T1.T, self._ZtZ12.reshape(n1, k1, q2)).reshape(q1, q2)
            B21 = self._rest.apply_transpose(factors[f.first :], self._ZtZ12.T)
            G_first = np.matmul(D, B11) + np.einsum("jla,jlb->lab", Minv21.reshape(q2, n1, k1), B21.reshape(q2, n1, k1))
            G_rest = Minv21 @ B12 + Minv22 @ B22
        else:
            G_rest = Minv22 @ B22
        if reml and p:
            K = lapack.dtrtrs(ev.RX, ev.RZX.T, lower=0, trans=1)[0].T  # R_ZX R_X^{-1}
            Y2 = L22inv.T @ K[q1:]
            Y = Y2
            if first:
                Y1 = np.matmul(L11inv.transpose(0, 2, 1), K[:q1].reshape(n1, k1, p)).reshape(q1, p) + Linv21.T @ K[q1:]
                Y = np.concatenate([Y1, Y2])
            YRt = lapack.dtrtrs(ev.RX, Y.T, lower=0, trans=0)[0].T  # Y R_X^{-T}
            W = relcov.apply(factors, Y)  # Lambda Y: (Y' B)' = Z'Z Lambda Y
            YtB_rest = (W[q1:].T @ self._ZtZ22) + (W[:q1].T @ self._ZtZ12 if first else 0.0)
            G_rest = G_rest + Y2 @ YtB_rest - YRt[q1:] @ self._XtZ[:, q1:]
            if first:
                YtB_first = W[:q1].T.reshape(p, n1, k1)  # (Z'Z Lambda Y)' on the first term's columns:
                YtB_first = np.einsum("plb,lbc->plc", YtB_first, f.G11) + (W[q1:].T @ self._ZtZ12.T).reshape(p, n1, k1)
                Y1_3 = Y[:q1].reshape(n1, k1, p)
                G_first = G_first + np.einsum("lap,plb->lab", Y1_3, YtB_first)
                XtZ1 = self._XtZ[:, :q1].reshape(p, n1, k1)
                G_first = G_first - np.einsum("lap,plb->lab", YRt[:q1].reshape(n1, k1, p), XtZ1)

        Ze = self._residual_products(factors, beta, u)
        return self._combine(G_first if first else np.zeros((0, 1, 1)), G_rest, Ze, u, dof / max(ev.r2, _TINY))

    def _combine(self, G_first, G_rest, Ze, u, scale) -> np.ndarray:
        """2 tr(G E_i) - 2 (dof / r^2) e'Z E_i u for every theta entry i, from G's diagonal blocks: the first
        term's per level (n1, k1, k1), the rest's as one q2 x q2 block."""
        f = self.factor
        q1 = f.q1
        gradient = np.empty(self.relcov.n_theta)
        first, transposed, straight, starts = self._entries
        n_first = first.shape[1]
        if n_first:
            a, b = first
            blocks = G_first.sum(axis=0)
            modes = Ze[:q1].reshape(f.n1, f.k1).T @ u[:q1].reshape(f.n1, f.k1)
            gradient[:n_first] = 2.0 * blocks[b, a] - 2.0 * scale * modes[a, b]
        if starts.size:
            Ze2, u2 = Ze[q1:], u[q1:]
            traces = np.add.reduceat(G_rest.ravel()[transposed], starts)
            products = np.add.reduceat(np.multiply.outer(Ze2, u2).ravel()[straight], starts)
            gradient[n_first:] = 2.0 * traces - 2.0 * scale * products
        return gradient


class SchurGradient:
    """d deviance / d theta for a system in the Schur form (core/factor.py, SchurFactor with the pair map): the
    first term (k x k template T, n1 levels) eliminated level by level, the terms after it with Lambda_2 diagonal
    (scalar terms: diag(lambda)) or block diagonal (a later term with slopes), their q2 x q2 block S dense, P =
    S^{-1}. With M_l = T'G11_l T + I, C_l = G_l' Lambda_2 P Lambda_2' G_l (G_l: the level's block of (Z'Z)_21; the
    pair map's adjoint) and U = (Z'Z)_21 H (Z'Z)_12 (H_l = T M_l^{-1} T', the update's products), the diagonal
    blocks of M^{-1} B are

        first term, level l:  M_l^{-1} B_l + M_l^{-1} T'C_l T M_l^{-1} B_l - M_l^{-1} T'C_l,   B_l = T'G11_l
        the rest, level m:    (P Lambda_2' ((Z'Z)_22 - U))_mm   (one entry per column where Lambda_2 is diagonal)

    and REML adds (Y Y'B - Y R_X^{-T} X'Z)'s, Y = L^{-T} R_ZX R_X^{-1} (two solves). One inverse of S (a LAPACK
    potri), the adjoint's pass over the pair map and a few products per level: about one evaluation's cost."""

    def __init__(self, factor, cross, relcov):
        self.factor, self.cross, self.relcov = factor, cross, relcov
        q1, k = factor.q1, factor.k1
        n1 = q1 // k
        blocks = sp.coo_matrix(cross.ZtZ[:q1, :q1])
        self._G11 = np.zeros((n1, k, k))
        self._G11[blocks.row // k, blocks.row % k, blocks.col % k] = blocks.data  # block diagonal: one level each
        g22 = sp.coo_matrix(cross.ZtZ[q1:, q1:])
        self._g22 = (g22.row, g22.col, g22.data)
        self._ZtX1 = cross.ZtX[:q1].reshape(n1, k, cross.p)
        self._positions = np.array(relcov.blocks[0][1].positions, dtype=np.intp).reshape(-1, 2).T
        self._rest_slices = [slice(s.start - q1, s.stop - q1) for s in relcov.column_slices[1:]]
        self._rest = relcov.__class__(relcov.blocks[1:])  # Lambda_2
        rows, cols = factor.destination_rows_columns()
        self._off = rows != cols  # the pair map's destinations below the diagonal (stored once for both triangles)

    def __call__(self, ev, beta: np.ndarray, u: np.ndarray, reml: bool, dof: int) -> np.ndarray:
        f, c, relcov = self.factor, self.cross, self.relcov
        q1, k, p = f.q1, f.k1, c.p
        n1 = q1 // k
        factors = ev.factors
        T = factors[0]
        lam = f.rest_scales(factors)
        P = f.schur_inverse()
        if P is None or f.unscaled_update is None:
            return np.full(relcov.n_theta, np.nan)
        rows, cols = f.destination_rows_columns()
        if lam is None:  # a later term with k > 1: Lambda_2 block diagonal, P Lambda_2' and Lambda_2 P Lambda_2' dense
            Q = self._rest.apply(factors[1:], P).T
            C = f.level_sums(self._rest.apply(factors[1:], Q)[rows, cols])
        else:
            Pd = P[rows, cols]
            C = f.level_sums(lam[rows] * lam[cols] * Pd)
        Linv = _lower_inverses(f.cholesky_blocks())
        Minv = np.matmul(Linv.transpose(0, 2, 1), Linv)  # M_l^{-1} = L_l^{-T} L_l^{-1}
        B11 = np.matmul(T.T, self._G11)
        MTt = np.matmul(Minv, T.T)
        MB = np.matmul(Minv, B11)
        first = MB + np.matmul(np.matmul(MTt, C), np.matmul(T, MB)) - np.matmul(MTt, C)
        blocks = first.sum(axis=0)
        U = f.unscaled_update
        gr, gc, gv = self._g22
        off = self._off
        if lam is None:
            # the level blocks of G_22 = P Lambda_2' (Z'Z_22 - G H G'): rest_blocks[j][y, i] = G_22[start(y) + i, y]
            rest_blocks = self._rest_blocks(Q, [(gr, gc, gv), (rows, cols, -U), (cols[off], rows[off], -U[off])])
        else:
            diagonal = -np.bincount(cols, Pd * lam[rows] * U, minlength=f.q2)
            diagonal -= np.bincount(rows[off], Pd[off] * lam[cols[off]] * U[off], minlength=f.q2)
            diagonal += np.bincount(gc, P[gc, gr] * lam[gr] * gv, minlength=f.q2)
        if reml and p:
            K = lapack.dtrtrs(ev.RX, np.ascontiguousarray(ev.RZX.T), lower=0, trans=1)[0].T  # R_ZX R_X^{-1}
            Y = f.half_solve_t(K)
            YRt = lapack.dtrtrs(ev.RX, np.ascontiguousarray(Y.T), lower=0, trans=0)[0].T  # Y R_X^{-T}
            ZZW = np.asarray(c.ZtZ @ relcov.apply(factors, Y))  # (Y' Lambda' Z'Z)'
            Y1, ZZW1, YRt1 = (M[:q1].reshape(n1, k, p) for M in (Y, ZZW, YRt))
            blocks = blocks + _level_products(Y1, ZZW1) - _level_products(YRt1, self._ZtX1)
            if lam is None:
                for out, sl, (_, template) in zip(rest_blocks, self._rest_slices, self._rest.blocks):
                    starts = _level_starts(sl, template.k)
                    for i in range(template.k):
                        out[:, i] += np.sum(Y[q1 + starts + i] * ZZW[q1:][sl], axis=1)
                        out[:, i] -= np.sum(YRt[q1 + starts + i] * c.ZtX[q1:][sl], axis=1)
            else:
                diagonal += np.sum(Y[q1:] * ZZW[q1:], axis=1) - np.sum(YRt[q1:] * c.ZtX[q1:], axis=1)
        Ze = c.residual_products(beta, relcov.apply(factors, u))
        scale = dof / max(ev.r2, _TINY)
        modes = Ze[:q1].reshape(n1, k).T @ u[:q1].reshape(n1, k)
        a, b = self._positions
        gradient = np.empty(relcov.n_theta)
        n_first = a.size
        gradient[:n_first] = 2.0 * blocks[b, a] - 2.0 * scale * modes[a, b]
        if lam is None:  # per later term, its template's positions (a, b): tr(G E_ab) and e'Z E_ab u over its levels
            at = n_first
            for out, sl, (n, template) in zip(rest_blocks, self._rest_slices, self._rest.blocks):
                kj = template.k
                traces = out.reshape(n, kj, kj).sum(axis=0)  # [a, b]: G_22[(m, b), (m, a)] summed over levels m
                products = Ze[q1:][sl].reshape(n, kj).T @ u[q1:][sl].reshape(n, kj)
                for a_j, b_j in template.positions:
                    gradient[at] = 2.0 * traces[a_j, b_j] - 2.0 * scale * products[a_j, b_j]
                    at += 1
            return gradient
        products = Ze[q1:] * u[q1:]
        for i, sl in enumerate(self._rest_slices):
            gradient[n_first + i] = 2.0 * diagonal[sl].sum() - 2.0 * scale * products[sl].sum()
        return gradient

    def _rest_blocks(self, Q: np.ndarray, entries) -> list[np.ndarray]:
        """For each later term j, (n_j k_j, k_j): [y, i] = sum over the entries (r, y, v) of Q[start(y) + i, r] v,
        start(y) the first column of y's level (the level blocks of Q B for B given by its entries, both
        triangles)."""
        out = []
        for sl, (n, template) in zip(self._rest_slices, self._rest.blocks):
            kj = template.k
            block = np.zeros((n * kj, kj))
            for r, y, v in entries:
                inside = (y >= sl.start) & (y < sl.stop)
                r, local, v = r[inside], y[inside] - sl.start, v[inside]
                start = sl.start + (local // kj) * kj
                for i in range(kj):
                    block[:, i] += np.bincount(local, Q[start + i, r] * v, minlength=n * kj)
            out.append(block)
        return out


def _level_starts(sl: slice, k: int) -> np.ndarray:
    """For each column of a term's slice (q2 coordinates), the first column of its level."""
    local = np.arange(sl.stop - sl.start)
    return sl.start + (local // k) * k


def level_pair_products(block: np.ndarray, nt: int, kt: int, ns: int, ks: int) -> np.ndarray:
    """[a, c, b, d] = sum over the level pairs (l, m) of block_(la),(mc) block_(lb),(md), for a block of two terms'
    columns (nt levels of kt, ns levels of ks; level-major): one Gram product (the Hessian's traces and MINQUE's
    moment equations)."""
    X = block.reshape(nt, kt, ns, ks).transpose(1, 3, 0, 2).reshape(kt * ks, nt * ns)
    return (X @ X.T).reshape(kt, ks, kt, ks)


def _level_products(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """sum over levels l of left_l right_l' for stacks (n, k, m): one (k x n m) by (n m x k) product."""
    n, k, m = left.shape
    return left.transpose(1, 0, 2).reshape(k, n * m) @ right.transpose(1, 0, 2).reshape(k, n * m).T


@functools.lru_cache(maxsize=64)
def psi_index(k: int, positions: tuple) -> "_PsiIndex":
    """_PsiIndex of a template (its k and theta's positions in T), built once per template shape."""
    return _PsiIndex(k, np.array(positions, dtype=np.intp).reshape(-1, 2).T)


class _PsiIndex:
    """Index tables between one k x k template's theta (entries at `positions` (rows, cols) of T) and psi, the
    entries (a, b), a >= b, of Sigma = T T'; `second` (m x n_theta x n_theta): psi's second derivatives in theta,
    constant: (E_i E_j' + E_j E_i')_ab = [c_i = c_j] ([r_i, r_j] = [a, b] or [b, a])."""

    def __init__(self, k: int, positions: np.ndarray):
        self.a, self.b = (np.ascontiguousarray(v, dtype=np.intp) for v in np.tril_indices(k))
        self.rows, self.cols = (np.ascontiguousarray(v, dtype=np.intp) for v in positions)
        same_column = self.cols[:, None] == self.cols[None, :]
        self.second = np.zeros((self.a.size, self.rows.size, self.rows.size))
        for t, (a, b) in enumerate(zip(self.a, self.b)):
            hit = ((self.rows[:, None] == a) & (self.rows[None, :] == b)) | (
                (self.rows[:, None] == b) & (self.rows[None, :] == a)
            )
            self.second[t] = same_column * hit * (2.0 if a == b else 1.0)
        # select (m x k^2): row t sums a k x k matrix's entries (a, b) and (b, a): tr(S E_ab) for symmetric S
        m = self.a.size
        self.select = np.zeros((m, k * k))
        self.select[np.arange(m), self.a * k + self.b] = 1.0
        self.select[np.arange(m), self.b * k + self.a] = 1.0


def _lower_inverses(L: np.ndarray) -> np.ndarray:
    """Inverses of a stack of lower-triangular k x k matrices, by forward substitution over the columns (numpy's
    batched inv took 9 ms for 50,000 blocks of 2 x 2)."""
    n, k, _ = L.shape
    if k == 1:
        return 1.0 / L
    inverse = np.zeros_like(L)
    for j in range(k):  # column j of L^{-1}: L x = e_j
        inverse[:, j, j] = 1.0 / L[:, j, j]
        for i in range(j + 1, k):
            inverse[:, i, j] = -np.sum(L[:, i, j:i] * inverse[:, j:i, j], axis=1) / L[:, i, i]
    return inverse
