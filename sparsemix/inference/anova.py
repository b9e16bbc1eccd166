"""Likelihood-ratio tests between nested models, as lme4's anova(m1, m2, ...), for any door's results that
offer what the test reads (COMPARABLE): today lmer's and the Dask door's."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special

from ..errors import InputError

__all__ = ["anova", "check_fitted_models"]

# What anova reads from a fitted model: its log-likelihood and parameter count, the criterion, the data (the
# response) and an ML refit.
COMPARABLE = ("llf", "npar", "reml", "nobs", "aic", "bic", "refit_ml", "design")


def anova(*models, names=None) -> pd.DataFrame:
    """Compare models fitted to the same data. REML fits are refitted by ML first, as lme4 does (REML
    likelihoods of models with different fixed effects are not comparable). Rows are ordered by the number of
    parameters; each row tests against the row above it."""
    if len(models) < 2:
        raise InputError("anova needs at least two fitted models to compare.")
    check_fitted_models(models)
    names = list(names) if names is not None else [f"m{i + 1}" for i in range(len(models))]
    if len(names) != len(models):
        raise InputError(f"{len(names)} names for {len(models)} models.")
    families = {getattr(getattr(m, "family", None), "name", "gaussian") for m in models}
    if len(families) > 1:
        raise InputError(
            f"the models have different response distributions ({', '.join(sorted(families))}): their likelihoods "
            "are of different things, and a likelihood-ratio test between them means nothing. Compare models of "
            "one family (lmer fits with lmer fits, binomial glmer fits with binomial ones)."
        )
    first = models[0]
    for name, m in zip(names, models):
        if m.nobs != first.nobs or not np.array_equal(m.design.y, first.design.y):
            raise InputError(
                f"model {name!r} was fitted to other data (nobs {m.nobs} vs {first.nobs}, or another "
                "response); models must share their data to be compared."
            )
    ml = [m if not m.reml else m.refit_ml() for m in models]
    order = sorted(range(len(ml)), key=lambda i: ml[i].npar)
    rows, prev = [], None
    for i in order:
        m = ml[i]
        row = {
            "npar": m.npar,
            "AIC": m.aic,
            "BIC": m.bic,
            "logLik": m.llf,
            "deviance": -2 * m.llf,
            "Chisq": np.nan,
            "Df": np.nan,
            "Pr(>Chisq)": np.nan,
        }
        if prev is not None:
            chisq = max(2 * (m.llf - prev.llf), 0.0)
            df = m.npar - prev.npar
            row.update({"Chisq": chisq, "Df": df, "Pr(>Chisq)": special.chdtrc(df, chisq) if df > 0 else np.nan})
        rows.append(row)
        prev = m
    table = pd.DataFrame(rows, index=[names[i] for i in order])
    table["Df"] = table["Df"].astype("Int64")  # whole numbers; missing on the first row
    table.attrs["refit"] = any(m.reml for m in models)
    return table


def check_fitted_models(models, door: str = "anova") -> None:
    """Every argument is a model fitted by sparsemix.lmer (anova compares fits)."""
    for i, m in enumerate(models):
        if not all(hasattr(m, name) for name in COMPARABLE):
            raise InputError(
                f"{door}'s arguments must be models fitted by sparsemix.lmer; argument {i + 1} is "
                f"{type(m).__name__} ({m!r:.60}). Pass the fitted models, e.g. anova(m1, m2); name "
                "them with names=[...]."
            )
