"""The relative covariance factor Lambda(theta): block diagonal, one template repeated per level.

Lambda is never formed as a matrix. Applying it (or its transpose) to a q x m array reshapes each term's
rows to (n_levels, k, m) and multiplies by the k x k template, which costs O(q k m).
"""
from __future__ import annotations

import numpy as np

from .terms import CovarianceTemplate

__all__ = ["RelativeCovariance"]


class RelativeCovariance:
    def __init__(self, blocks: list[tuple[int, CovarianceTemplate]]):
        self.blocks = list(blocks)
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

    @property
    def on_diagonal(self) -> np.ndarray:
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

    def apply_transpose(self, factors: list[np.ndarray], M: np.ndarray) -> np.ndarray:
        """Lambda' M for M of shape (q,) or (q, m)."""
        return self._apply(factors, M, transpose=True)

    def apply(self, factors: list[np.ndarray], M: np.ndarray) -> np.ndarray:
        """Lambda M for M of shape (q,) or (q, m)."""
        return self._apply(factors, M, transpose=False)

    def _apply(self, factors, M, transpose):
        M = np.asarray(M, dtype=float)
        vector = M.ndim == 1
        M2 = M.reshape(M.shape[0], -1)
        out = np.empty_like(M2)
        for (n_levels, template), T, cols in zip(self.blocks, factors, self.column_slices):
            k = template.k
            blk = M2[cols].reshape(n_levels, k, -1)
            op = T.T if transpose else T
            if k == 1:
                out[cols] = (op[0, 0] * blk).reshape(n_levels, -1)
            else:
                out[cols] = np.einsum("ij,ajm->aim", op, blk).reshape(n_levels * k, -1)
        return out.ravel() if vector else out
