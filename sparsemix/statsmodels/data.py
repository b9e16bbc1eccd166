"""`model.data`: the names and original inputs statsmodels keeps on its data wrapper.

statsmodels users read `model.data.xnames`, `ynames`, `param_names`, `exog_re_names`, `frame` (the formula's
data frame), `orig_endog` / `orig_exog` (the inputs as given, pandas objects included) and `row_labels`.
This holds the same attributes; it is built from the model and copies nothing large.
"""

from __future__ import annotations

__all__ = ["ModelData"]


class ModelData:
    def __init__(self, model, orig_endog, orig_exog, frame=None):
        self._model = model
        self.orig_endog = orig_endog
        self.orig_exog = orig_exog
        self.frame = frame
        self.formula = model.formula
        self.design_info = model._design_info

    # The arrays the model fits (after missing='drop'), as statsmodels' data.endog / data.exog.
    @property
    def endog(self):
        return self._model.endog

    @property
    def exog(self):
        return self._model.exog

    @property
    def exog_re(self):
        return self._model.exog_re

    @property
    def groups(self):
        return self._model.groups

    @property
    def ynames(self) -> str:
        return self._model.endog_names

    @property
    def xnames(self) -> list[str]:
        return list(self._model.exog_names)

    # statsmodels' models expose these two as model.endog_names / model.exog_names; kept here as well.
    endog_names = ynames
    exog_names = xnames

    @property
    def param_names(self) -> list[str]:
        return list(self._model.param_names)

    @property
    def cov_names(self) -> list[str]:
        return list(self._model.param_names)

    @property
    def exog_re_names(self) -> list[str]:
        return list(self._model.exog_re_names)

    @property
    def exog_re_names_full(self) -> list[str]:
        return list(self._model.exog_re_names_full)

    @property
    def vcomp_names(self) -> list[str]:
        return list(self._model._vc_names)

    @property
    def row_labels(self):
        """The index of the rows fitted (pandas inputs), else None."""
        return self._model._row_index

    @property
    def k_constant(self) -> int:
        return int(self.const_idx is not None)

    @property
    def const_idx(self):
        """Column of exog that is constant and non-zero (statsmodels' intercept detection), else None."""
        X = self._model.exog
        if X is None or X.shape[0] == 0:
            return None
        for j in range(X.shape[1]):
            col = X[:, j]
            if col[0] != 0 and (col == col[0]).all():
                return j
        return None

    def __repr__(self):
        return f"ModelData(ynames={self.ynames!r}, xnames={self.xnames!r})"
