"""statsmodels' parameter containers: `VCSpec` and `MixedLMParams`, with the same packing conventions.

Packing (as statsmodels): [fe_params (if has_fe), lower triangle of cov_re in row-major order (numpy's
tril_indices), vcomp]. With use_sqrt the covariance block holds the lower Cholesky factor of cov_re and the
vcomp block holds square roots.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["VCSpec", "MixedLMParams"]


class VCSpec:
    """Variance components: `mats[j][i]` is the n_i x m_ij design of component `names[j]` in group i
    (groups in sorted label order), `colnames[j][i]` names its columns."""

    def __init__(self, names, colnames, mats):
        self.names = list(names)
        self.colnames = colnames
        self.mats = mats
        if not (len(self.names) == len(colnames) == len(mats)):
            raise InputError(
                f"VCSpec needs one entry per component in names, colnames and mats; got "
                f"{len(self.names)}, {len(colnames)} and {len(mats)}."
            )

    def __repr__(self):
        return f"VCSpec(names={self.names!r})"


class MixedLMParams:
    """The parameters of a MixedLM, as statsmodels packs them. cov_re and vcomp are *unscaled* here
    (relative to the residual variance), as in statsmodels' optimisation."""

    def __init__(self, k_fe: int, k_re: int, k_vc: int):
        self.k_fe = int(k_fe)
        self.k_re = int(k_re)
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self.k_vc = int(k_vc)
        self.k_tot = self.k_fe + self.k_re2 + self.k_vc
        self._ix = np.tril_indices(self.k_re)
        self.fe_params = np.zeros(self.k_fe)
        self.cov_re = np.zeros((self.k_re, self.k_re))
        self.vcomp = np.zeros(self.k_vc)

    @staticmethod
    def from_packed(params, k_fe, k_re, use_sqrt, has_fe) -> "MixedLMParams":
        params = np.asarray(params, dtype=float)
        k_re2 = int(k_re * (k_re + 1) // 2)
        k_vc = params.shape[0] - k_re2 - (k_fe if has_fe else 0)
        if k_vc < 0:
            raise InputError(
                f"packed parameters of length {params.shape[0]} are too short for k_fe={k_fe}, "
                f"k_re={k_re} (has_fe={has_fe})."
            )
        pa = MixedLMParams(k_fe, k_re, k_vc)
        start = 0
        if has_fe:
            pa.fe_params = params[:k_fe].copy()
            start = k_fe
        block = params[start : start + k_re2]
        vc = params[start + k_re2 :]
        M = np.zeros((k_re, k_re))
        M[pa._ix] = block
        if use_sqrt:
            pa.cov_re = M @ M.T
            pa.vcomp = vc**2
        else:
            pa.cov_re = M + M.T - np.diag(np.diag(M))
            pa.vcomp = vc.copy()
        return pa

    @staticmethod
    def from_components(fe_params=None, cov_re=None, cov_re_sqrt=None, vcomp=None) -> "MixedLMParams":
        fe = np.zeros(0) if fe_params is None else np.asarray(fe_params, dtype=float)
        vc = np.zeros(0) if vcomp is None else np.asarray(vcomp, dtype=float)
        if cov_re_sqrt is not None:
            S = np.atleast_2d(np.asarray(cov_re_sqrt, dtype=float))
            cov = S @ S.T
        elif cov_re is not None:
            cov = np.atleast_2d(np.asarray(cov_re, dtype=float))
        else:
            cov = np.zeros((0, 0))
        pa = MixedLMParams(fe.shape[0], cov.shape[0], vc.shape[0])
        pa.fe_params, pa.cov_re, pa.vcomp = fe, cov, vc
        return pa

    def cov_re_sqrt(self) -> np.ndarray:
        """Lower Cholesky factor of cov_re; statsmodels' fallback diag(sqrt(diag)) when it is not PD."""
        if self.k_re == 0:
            return np.zeros((0, 0))
        try:
            return np.linalg.cholesky(self.cov_re)
        except np.linalg.LinAlgError:
            return np.diag(np.sqrt(np.maximum(np.diag(self.cov_re), 0.0)))

    def get_packed(self, use_sqrt, has_fe=False) -> np.ndarray:
        if use_sqrt:
            re_part = self.cov_re_sqrt()[self._ix]
            vc_part = np.sqrt(np.maximum(self.vcomp, 0.0))
        else:
            re_part = np.asarray(self.cov_re)[self._ix]
            vc_part = np.asarray(self.vcomp, dtype=float)
        parts = ([np.asarray(self.fe_params, dtype=float)] if has_fe else []) + [re_part, vc_part]
        return np.concatenate(parts)

    def copy(self) -> "MixedLMParams":
        return MixedLMParams.from_components(
            np.array(self.fe_params, dtype=float, copy=True),
            np.array(self.cov_re, dtype=float, copy=True),
            vcomp=np.array(self.vcomp, dtype=float, copy=True),
        )

    def __repr__(self):
        return f"MixedLMParams(k_fe={self.k_fe}, k_re={self.k_re}, k_vc={self.k_vc})"
