"""R's poly(x, degree): orthogonal polynomials, as a patsy stateful transform (new data reuses the training
data's recurrence, so predictions see the same columns)."""

from __future__ import annotations

import numpy as np
import patsy

from ..errors import FormulaError

__all__ = ["poly"]


class _Poly:
    def __init__(self):
        self._chunks = []

    def memorize_chunk(self, x, degree=1):
        self._chunks.append(np.asarray(x, dtype=float).ravel())
        self.degree = int(degree)

    def memorize_finish(self):
        self._fit(np.concatenate(self._chunks), self.degree)
        self._chunks = None

    def transform(self, x, degree=1):
        x = np.asarray(x, dtype=float).ravel()
        if int(degree) != self.degree:
            raise FormulaError("poly(): the degree must not change between fitting and prediction.")
        # R's three-term recurrence with the training data's alpha and norm2.
        Z = np.empty((x.shape[0], degree + 1))
        Z[:, 0] = 1.0
        if degree >= 1:
            Z[:, 1] = x - self.alpha[0]
        for i in range(1, degree):
            Z[:, i + 1] = (x - self.alpha[i]) * Z[:, i] - (self.norm2[i + 1] / self.norm2[i]) * Z[:, i - 1]
        return Z[:, 1:] / np.sqrt(self.norm2[2:])

    def _fit(self, x, degree):
        if degree < 1:
            raise FormulaError(f"poly(): degree must be at least 1; got {degree}.")
        if np.unique(x).shape[0] <= degree:
            raise FormulaError(f"poly(): degree {degree} needs more than {degree} distinct values of x.")
        center = x.mean()
        xc = x - center
        Q, R = np.linalg.qr(np.vander(xc, degree + 1, increasing=True))
        z = Q * np.diag(R)
        norm2 = np.sum(z**2, axis=0)
        self.alpha = np.sum(xc[:, None] * z**2, axis=0)[:degree] / norm2[:degree] + center
        self.norm2 = np.concatenate([[1.0], norm2])


poly = patsy.stateful_transform(_Poly)
