"""The relative covariance factor Lambda(theta): block diagonal, one template repeated per level.

Lambda is never formed as a matrix. Applying it (or its transpose) to a q x m array reshapes each term's
rows to (n_levels, k, m) and multiplies by the k x k template, which costs O(q k m).

theta is reported for the columns of Z as the data gave them; the system may work on centred and scaled
columns Z (I kron T) (coordinates.py). `factors(theta)` are the reported templates, `system_factors(theta)`
the same covariance for the system's columns (T^{-1} times them), and a working theta (`working_theta`) is
the lower-triangular template of the system's columns, the optimizer's coordinates.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np

from .coordinates import lower_factor, lower_factors
from .terms import CovarianceTemplate

__all__ = ["RelativeCovariance"]

# A term's covariance (relative to sigma^2, on centred and scaled columns) with a singular value of its factor
# below this is probed for a missing direction (an sd below 0.1% of the residual's: zero for any purpose).
RANK_PROBE_NULL = 1e-3
# The probes' sizes, as variances relative to sigma^2: the small one sees a first-order descent, the large one
# a second-order one (a scalar variance, whose deviance is even in theta at zero).
RANK_PROBE_SIZES = (1e-4, 1e-2)
# The cross terms' steps (both signs), as entries of the factor.
RANK_PROBE_STEPS = (-1e-2, 1e-2, -1e-1, 1e-1)


class RelativeCovariance:
    """The relative covariance factor Lambda(theta) of all random terms: one covariance template per term
    (blocks: (levels, template)), theta laid out term by term, applied blockwise (Lambda is never formed); and
    the working coordinates the optimizer uses (column_transforms, coordinates.py)."""

    def __init__(self, blocks: list[tuple[int, CovarianceTemplate]], column_transforms=None):
        """`column_transforms`: per term, None or the k x k T of the system's columns Z (I kron T)."""
        self.blocks = list(blocks)
        self.column_transforms = [None] * len(self.blocks) if column_transforms is None else list(column_transforms)
        self.n_theta = sum(t.n_theta for _, t in self.blocks)
        self.q = sum(n * t.k for n, t in self.blocks)
        self.theta_slices = []
        self.column_slices = []
        th = col = 0
        for n_levels, template in self.blocks:
            self.theta_slices.append(slice(th, th + template.n_theta))
            self.column_slices.append(slice(col, col + n_levels * template.k))
            th += template.n_theta
            col += n_levels * template.k

    @cached_property  # (the scoring steps' reductions by term, every point)
    def column_counts(self) -> np.ndarray:
        """Each term's number of columns."""
        return np.array([sl.stop - sl.start for sl in self.column_slices], dtype=np.intp)

    @cached_property
    def column_starts(self) -> np.ndarray:
        """Each term's first column."""
        return np.array([sl.start for sl in self.column_slices], dtype=np.intp)

    def merged(self, runs: tuple[tuple[int, int], ...]) -> "tuple[RelativeCovariance, np.ndarray]":
        """This covariance with each run [start, stop) of scalar terms (terms.same_grouping_runs) as one term with a
        diagonal template, and the order of the system's columns that it describes (the merged Z is Z[:, order]: a
        run's columns level by level, its terms' columns of a level side by side). theta is the same vector in
        both, and so is the working theta (a run's column transforms are scalings: the merged one their diagonal)."""
        blocks, transforms, order = [], [], []
        starts = {start: stop for start, stop in runs}
        j = 0
        while j < len(self.blocks):
            stop = starts.get(j, j + 1)
            n_levels, template = self.blocks[j]
            if stop == j + 1:
                blocks.append((n_levels, template))
                transforms.append(self.column_transforms[j])
                order.append(np.arange(self.column_slices[j].start, self.column_slices[j].stop))
            else:
                scales = [self.column_transforms[i] for i in range(j, stop)]
                k = stop - j
                blocks.append((n_levels, CovarianceTemplate.diagonal(k)))
                transforms.append(
                    None
                    if all(T is None for T in scales)
                    else np.diag([1.0 if T is None else float(T[0, 0]) for T in scales])
                )
                first = np.array([self.column_slices[i].start for i in range(j, stop)])
                order.append((np.arange(n_levels)[:, None] + first[None, :]).ravel())
            j = stop
        return RelativeCovariance(blocks, transforms), np.concatenate(order) if order else np.zeros(0, np.intp)

    @property
    def after_first(self) -> int:
        """The columns after the first term's: the order of the block that eliminating that term leaves."""
        return self.q - self.blocks[0][0] * self.blocks[0][1].k if self.blocks else 0

    @cached_property
    def membership(self) -> np.ndarray:
        """q x terms: 1 where column i belongs to term j (sums per term are products with it)."""
        E = np.zeros((self.q, len(self.blocks)))
        for j, cols in enumerate(self.column_slices):
            E[cols, j] = 1.0
        return E

    @property
    def on_diagonal(self) -> np.ndarray:
        return self._on_diagonal.copy()

    @cached_property  # (the blocks never change; read several times a fit)
    def _on_diagonal(self) -> np.ndarray:
        return np.concatenate([t.on_diagonal() for _, t in self.blocks]) if self.blocks else np.zeros(0, bool)

    @property
    def lower_bounds(self) -> np.ndarray:
        """Diagonal entries of each template are standard deviations (relative to sigma): >= 0."""
        return np.where(self.on_diagonal, 0.0, -np.inf)

    def start(self) -> np.ndarray:
        return np.concatenate([t.start() for _, t in self.blocks]) if self.blocks else np.zeros(0)

    def factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """The k x k template T of every term."""
        theta = np.asarray(theta, dtype=float)
        return [t.factor(theta[s]) for (_, t), s in zip(self.blocks, self.theta_slices)]

    def theta_of(self, factors: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([t.theta_of(T) for (_, t), T in zip(self.blocks, factors)])

    @property
    def column_diagonals(self) -> np.ndarray:
        """For each entry of theta, the index in theta of its template column's diagonal entry: the deviance is
        unchanged where a column of T changes sign (T T' is), so it is even in that column's entries together."""
        out = np.empty(self.n_theta, dtype=np.intp)
        for (_, template), sl in zip(self.blocks, self.theta_slices):
            diagonal = {j: sl.start + a for a, (i, j) in enumerate(template.positions) if i == j}
            for a, (_, j) in enumerate(template.positions):
                out[sl.start + a] = diagonal.get(j, sl.start + a)
        return out

    @property
    def transformed(self) -> bool:
        """Whether the system's columns differ from the data's (working and reported theta differ)."""
        return any(T is not None for T in self.column_transforms)

    def system_factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """The factors that, applied to the system's columns, give the covariance that theta reports."""
        return [F if T is None else np.linalg.solve(T, F) for F, T in zip(self.factors(theta), self.column_transforms)]

    @cached_property
    def _scalings(self) -> np.ndarray | None:
        """Where every term is diagonal and its transform a scaling (scalar terms; lme4's || merged): each theta
        entry's scale (working = |theta| / scale), else None."""
        out = []
        for (_, template), T in zip(self.blocks, self.column_transforms):
            rows = [i for i, j in template.positions if i == j]
            if len(rows) < template.n_theta:  # (a correlation)
                return None
            if T is None:
                out.append(np.ones(len(rows)))
            elif T.shape[0] == 1 or np.count_nonzero(T - np.diag(np.diagonal(T))) == 0:  # (1 x 1: a scaling)
                out.append(np.diagonal(T)[rows])
            else:
                return None
        return np.concatenate(out) if out else np.zeros(0)

    def working_theta(self, theta: np.ndarray) -> np.ndarray:
        """The optimizer's coordinates of a reported theta."""
        if not self.transformed:
            return np.asarray(theta, dtype=float)
        if self._scalings is not None:  # (lower_factor's QR of each diagonal: |T^-1 F|)
            return np.abs(np.asarray(theta, dtype=float)) / self._scalings
        return self.theta_of(
            [F if T is None else lower_factor(F) for F, T in zip(self.system_factors(theta), self.column_transforms)]
        )

    def reported_theta(self, working: np.ndarray) -> np.ndarray:
        """The reported theta of working coordinates (inverse of working_theta)."""
        if not self.transformed:
            return np.asarray(working, dtype=float)
        if self._scalings is not None:
            return np.abs(np.asarray(working, dtype=float)) * self._scalings
        return self.theta_of(
            [F if T is None else lower_factor(T @ F) for F, T in zip(self.factors(working), self.column_transforms)]
        )

    def reported_thetas(self, working: np.ndarray) -> np.ndarray:
        """reported_theta of every row of `working` (R x n_theta) at once: the templates as stacks, lower_factor's
        QR batched (a QR per response and term took most of lmer_many's time outside the deviance)."""
        working = np.asarray(working, dtype=float)
        if not self.transformed:
            return working.copy()
        out = working.copy()
        for (_, template), T, sl in zip(self.blocks, self.column_transforms, self.theta_slices):
            if T is None:
                continue
            rows, cols = template._index
            out[:, sl] = lower_factors(np.matmul(T, template.factors(working[:, sl])))[:, rows, cols]
        return out

    def near_singular(self, thetas: np.ndarray) -> np.ndarray:
        """For every row of `thetas` (R x n_theta), whether some term's factor has a singular value at or below
        RANK_PROBE_NULL: the rows that rank_probes gives probes for (the others need no release check)."""
        thetas = np.atleast_2d(np.asarray(thetas, dtype=float))
        out = np.zeros(thetas.shape[0], dtype=bool)
        for (_, template), sl in zip(self.blocks, self.theta_slices):
            F = template.factors(thetas[:, sl])
            if template.is_diagonal:
                smallest = np.abs(np.diagonal(F, axis1=1, axis2=2)).min(axis=1)
            else:
                smallest = np.linalg.svd(F, compute_uv=False).min(axis=1)
            out |= smallest <= RANK_PROBE_NULL
        return out

    def scalar_scales(self, factors: list[np.ndarray]) -> np.ndarray | None:
        """Lambda's diagonal, one scale per column, where every term is scalar (1 x 1 templates); None otherwise."""
        if not all(T.shape == (1, 1) for T in factors):
            return None
        return np.repeat(np.array([T[0, 0] for T in factors], dtype=float), [n for n, _ in self.blocks])

    def to_data_columns(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        """Random effects (q,) or (q, m) for the system's columns, carried to the data's: b_level = T b_level
        (T' b_level with `transpose`)."""
        if not self.transformed:
            return b
        out = np.array(b, dtype=float)
        flat = out.reshape(out.shape[0], -1)
        for (n_levels, template), T, cols in zip(self.blocks, self.column_transforms, self.column_slices):
            if T is not None:
                blk = flat[cols].reshape(n_levels, template.k, -1)
                flat[cols] = np.einsum("ij,ajm->aim", T.T if transpose else T, blk).reshape(n_levels * template.k, -1)
        return out

    def rank_probes(self, theta: np.ndarray) -> list[np.ndarray]:
        """Points a small step into the interior from each (nearly) singular term covariance Psi = F F'.

        For each null direction v of Psi: F + h v e_i' (Psi gains h (F_i v' + v F_i') + h^2 v v', a first-order
        move that correlates the missing direction with column i) at both signs, and [F, sqrt(eps) v] (Psi + eps
        v v', which sees a second-order descent); with several null directions, also their sums and
        differences. Taken on Psi, not on theta: at a zero diagonal the template is not unique (the entries after
        it can rotate), and the slope into the interior depends on the representative one starts from."""
        theta = np.asarray(theta, dtype=float)
        moves: list = []  # (theta slice, template, M): the probe's factor is lower_factor(M)

        def probe_with(sl, template, M):
            moves.append((sl, template, M))

        for (_, template), F, sl in zip(self.blocks, self.factors(theta), self.theta_slices):
            if template.is_diagonal:  # stays diagonal: only a variance can grow
                null = np.eye(template.k)[:, np.abs(np.diag(F)) <= RANK_PROBE_NULL]
            else:
                U, singular_values, _ = np.linalg.svd(F)
                null = U[:, singular_values <= RANK_PROBE_NULL]
            directions = list(null.T) + [
                (null[:, a] + sign * null[:, c]) / np.sqrt(2)
                for a in range(null.shape[1])
                for c in range(a)
                for sign in (1, -1)
            ]
            for v in directions:
                for eps in RANK_PROBE_SIZES:
                    probe_with(sl, template, np.column_stack([F, np.sqrt(eps) * v]))
                if template.is_diagonal:
                    continue
                for i in range(template.k):
                    for h in RANK_PROBE_STEPS:
                        probe_with(sl, template, F + np.outer(h * v, np.eye(template.k)[i]))
        # one batched QR per shape of M (one a probe took 20 us, most of a growth curve's boundary check)
        factors: list = [None] * len(moves)
        for shape in {M.shape for _, _, M in moves}:
            which = [i for i, (_, _, M) in enumerate(moves) if M.shape == shape]
            for i, L in zip(which, lower_factors(np.stack([moves[i][2] for i in which]))):
                factors[i] = L
        probes = []
        for (sl, template, _), L in zip(moves, factors):
            probe = theta.copy()
            probe[sl] = template.theta_of(L)
            probes.append(probe)
        return probes

    def boundary_probes(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """rank_probes(theta), each with the theta equal to `theta` in Lambda Lambda' that lies nearest it: (start,
        probe) pairs. A template column whose diagonal entry is 0 can change sign without changing the covariance,
        and the probes (built from the covariance) can lie close to one sign and far from the other: a slope
        into the interior means something only along a short way (a 2 x 2 term at [0, -0.197, 0] showed no
        descent towards a probe at [0.01, 0.197, 0], which is 1e-4 from [0, 0.197, 0] along its way down)."""
        theta = np.asarray(theta, dtype=float)
        variants = [theta]
        for (_, template), sl in zip(self.blocks, self.theta_slices):
            for j in range(template.k):
                column = [sl.start + a for a, (_, c) in enumerate(template.positions) if c == j]
                diagonal = sl.start + template.positions.index((j, j)) if (j, j) in template.positions else None
                if diagonal is None or theta[diagonal] != 0 or not np.any(theta[column]):
                    continue
                flipped = [v.copy() for v in variants]
                for v in flipped:
                    v[column] = -v[column]
                variants += flipped
        # (with several null directions, or a zero column, some probes coincide: each is evaluated once)
        unique = {probe.tobytes(): probe for probe in self.rank_probes(theta)}
        return [(min(variants, key=lambda v: float(np.linalg.norm(p - v))), p) for p in unique.values()]

    def apply_transpose(self, factors: list[np.ndarray], M: np.ndarray) -> np.ndarray:
        """Lambda' M for M of shape (q,) or (q, m)."""
        return self._apply(factors, M, transpose=True)

    def apply(self, factors: list[np.ndarray], M: np.ndarray) -> np.ndarray:
        """Lambda M for M of shape (q,) or (q, m)."""
        return self._apply(factors, M, transpose=False)

    def _apply(self, factors, M, transpose):
        M = np.ascontiguousarray(M, dtype=float)  # (a transposed matrix: its level blocks are then views)
        vector = M.ndim == 1
        M2 = M.reshape(M.shape[0], math.prod(M.shape[1:]))  # (-1 cannot be inferred for an empty M)
        out = np.empty_like(M2)
        for (n_levels, template), T, cols in zip(self.blocks, factors, self.column_slices):
            k = template.k
            blk = M2[cols].reshape(n_levels, k, -1)
            op = T.T if transpose else T
            if k == 1:
                out[cols] = (op[0, 0] * blk).reshape(n_levels, -1)
            elif blk.shape[2] == 1:  # a vector: row i of each level's result as k scaled rows (a tenth of the
                level = out[cols].reshape(n_levels, k, 1)  # batched matmul's 1.5 ms at 50,000 levels of 2 x 2)
                for i in range(k):
                    np.multiply(blk[:, 0], op[i, 0], out=level[:, i])
                    for j in range(1, k):
                        level[:, i] += op[i, j] * blk[:, j]
            else:  # a batched matmul: einsum took 5 ms for 50,000 levels of 2 x 2
                out[cols] = np.matmul(op, blk).reshape(n_levels * k, -1)
        return out.ravel() if vector else out
