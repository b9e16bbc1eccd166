"""One model, many responses: `lmer_many(formula, data, responses)`, the first response fitted by `lmer`
and each further one by `LmerResults.refit(y)` (lme4's `refit(object, newresp)`, results.py).

Only the response changes between the fits, so each refit reuses the design (X, Z and the terms, read once by
build_design), the cross-products' fixed part Z'Z, Z'X, X'X (CrossProducts.with_response recomputes Z'y, X'y,
y'y only) and CHOLMOD's symbolic analysis (PenalizedSystem.with_response hands the analysed factor on from fit
to fit), and starts the optimizer from the fitted theta with a warm first step. Each fit then goes through the
one pipeline (fit.pipeline.fit_system) with the full-precision polish: the result is the fit a fresh `lmer` on
data holding that response gives, to the optimizer's precision (~1e-8 in theta).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import checks
from ..errors import InputError
from ..formula.lme4 import parse_formula
from .lmer import lmer
from .results import response_vector

__all__ = ["lmer_many"]


def _response_columns(responses, n_rows: int) -> list[np.ndarray]:
    if isinstance(responses, pd.DataFrame):
        columns = [responses[c].to_numpy() for c in responses.columns]
    elif isinstance(responses, np.ndarray) and responses.ndim == 2:
        if responses.shape[0] != n_rows:
            raise InputError(
                f"responses has {responses.shape[0]} rows but data has {n_rows}; pass an array with one row per "
                "row of data and one column per response."
            )
        columns = list(responses.T)
    elif isinstance(responses, (list, tuple)):
        columns = list(responses)
    else:
        raise InputError(
            "responses must be a list of vectors, a 2-D array (one column per response) or a DataFrame; got "
            f"{type(responses).__name__}."
        )
    if not columns:
        raise InputError("responses is empty; give at least one response.")
    for i, c in enumerate(columns):
        if np.ndim(c) != 1 or len(c) != n_rows:
            raise InputError(
                f"response {i} has shape {np.shape(c)}; each response needs one value per row of data ({n_rows})."
            )
    return columns


def lmer_many(formula: str, data: pd.DataFrame, responses, **kwargs) -> list:
    """Fit `formula` to each of `responses` (a list of vectors, a 2-D array with one column per response, or a
    DataFrame, each with one value per row of `data`): a list of LmerResults, in order. The formula's left-hand
    side names the response in the results (it need not be a column of `data`). The design is read once and
    the first response fitted as `lmer(formula, data, **kwargs)` would; every further response is a
    `refit(y)` of that fit. Rows that `lmer` drops for missing values in the model's other variables are
    dropped from every response; the responses must be complete in the rows kept."""
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"data must be a pandas DataFrame; got {type(data).__name__}.")
    columns = _response_columns(responses, len(data))
    response = parse_formula(formula).response
    if not response.isidentifier():
        raise InputError(
            f"lmer_many names the responses by the formula's left-hand side, {response!r}, which is not a plain "
            "name; write a name such as 'y ~ ...' and transform the responses before passing them."
        )
    first_values = checks.as_numeric_vector(columns[0], "response 0")
    if not np.all(np.isfinite(first_values)):
        raise InputError(
            f"response 0 has missing or infinite values (rows {np.flatnonzero(~np.isfinite(first_values))[:5].tolist()}"
            "...); lmer_many fits every response to the same rows: drop those rows from data and responses first."
        )
    first = lmer(formula, data.assign(**{response: first_values}), **kwargs)
    if len(columns) == 1:
        return [first]
    rows = _fitted_positions(data, first)
    out = [first]
    for i, column in enumerate(columns[1:], start=1):
        out.append(first.refit(response_vector(column[rows], first.nobs, f"response {i}")))
    return out


def _fitted_positions(data: pd.DataFrame, results) -> np.ndarray:
    """Positions in `data` of the rows the fit kept."""
    if results.design.n_dropped == 0:
        return np.arange(len(data))
    if not data.index.is_unique:
        raise InputError(
            "lmer_many dropped rows with missing values, and data's index has duplicate labels, so the rows kept "
            "cannot be matched to the responses: drop the incomplete rows first, or reset the index."
        )
    return data.index.get_indexer(results.design.row_index)
