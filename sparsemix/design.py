"""Assemble the model's matrices and the cross-products the deviance needs.

After `CrossProducts.compute` nothing downstream touches the n rows again: every deviance evaluation works
on Z'Z, Z'X, Z'y, X'X, X'y and y'y, whose sizes depend on the number of levels, not on n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .terms import RandomTerm

__all__ = ["assemble_Z", "CrossProducts"]


def assemble_Z(terms: list[RandomTerm]) -> sp.csc_matrix:
    """Z = [Z_1 | Z_2 | ...] as one CSC matrix, in term order."""
    return sp.hstack([t.Z for t in terms], format="csc")


@dataclass(frozen=True)
class CrossProducts:
    """Sums over rows, computed once.

    y enters as its residual from ordinary least squares (`y - X beta_ols`), not as given: the fit is exactly
    equivariant under that shift (beta moves by beta_ols, nothing else changes) and it keeps y'y from
    swamping the penalized residual sum of squares when y has a large mean (y around 1e9, say).
    """

    ZtZ: sp.csc_matrix      # q x q, symmetric, both triangles stored
    ZtX: np.ndarray         # q x p
    Zty: np.ndarray         # q
    XtX: np.ndarray         # p x p
    Xty: np.ndarray         # p
    yty: float
    n: int
    p: int
    beta_ols: np.ndarray    # the shift that was taken out of y
    sum_log_weights: float  # enters the ML deviance when prior weights are given

    @classmethod
    def compute(cls, X: np.ndarray, y: np.ndarray, Z: sp.csc_matrix, weights: np.ndarray | None = None
                ) -> "CrossProducts":
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        n, p = X.shape
        sum_log_weights = 0.0
        if weights is not None:
            # Prior weights: rescale rows by sqrt(w); the likelihood gains sum(log w) / 2.
            sw = np.sqrt(np.asarray(weights, dtype=float))
            X = X * sw[:, None]
            y = y * sw
            Z = sp.diags(sw) @ Z
            sum_log_weights = float(np.sum(np.log(weights)))
        beta_ols = np.zeros(p)
        r = y
        for _ in range(2 if p else 0):   # a second pass removes what rounding left of X's span in r
            step = np.linalg.lstsq(X, r, rcond=None)[0]
            beta_ols = beta_ols + step
            r = y - X @ beta_ols
        Zt = sp.csr_matrix(Z.T)
        ZtZ = sp.csc_matrix(Zt @ Z)
        ZtZ.sort_indices()
        return cls(ZtZ=ZtZ, ZtX=np.asarray(Zt @ X), Zty=np.asarray(Zt @ r).ravel(), XtX=X.T @ X, Xty=X.T @ r,
                   yty=float(r @ r), n=n, p=p, beta_ols=beta_ols, sum_log_weights=sum_log_weights)
