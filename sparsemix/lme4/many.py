"""One model, many responses: `lmer_many(formula, data, responses)`, the first response fitted by `lmer`, the
others together from its theta.

Only the response changes between the fits, so they share the design (X, Z and the terms, read once by
build_design) and the cross-products' fixed part Z'Z, Z'X, X'X; each response adds only its sums Z'y, X'y,
y'y (CrossProducts.response_sums, one sparse product for all). Where the first fit's system is held dense (small
designs), every response's optimum is found at once by batched Newton steps (fit/many.py over
core/batched.py: the deviance of all responses in whole-array operations); a response those steps do not settle
(an optimum near a boundary, or no convergence) is fitted by `LmerResults.refit(y)` (lme4's
`refit(object, newresp)`, results.py), which goes through the one pipeline with its boundary checks, as every
response does where the system is not held dense. Either way the result is the fit a fresh `lmer` on data
holding that response gives, to the optimizer's precision (~1e-8 in theta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from .. import checks
from ..core.coordinates import system_columns
from ..core.threads import fit_threads
from ..errors import InputError
from ..fit.many import batched_applies, fit_responses
from ..fit.optimize import GRADIENT_METHOD, OptimizationResult
from ..fit.pipeline import finish_fit
from ..formula.lme4 import parse_formula
from ..inference.sdcor import sdcor_of
from .lmer import lmer
from .results import LmerResults, response_vector

__all__ = ["lmer_many", "ManyFits"]


def _response_columns(responses, n_rows: int) -> list[np.ndarray]:
    if isinstance(responses, pd.DataFrame):
        numeric = all(isinstance(t, np.dtype) and t.kind in "iuf" for t in responses.dtypes)
        # one conversion for a frame of numbers (a column lookup costs ~25 us: 25 ms for 1,000 responses)
        columns = list(responses.to_numpy(dtype=float).T) if numeric else [responses[c].to_numpy() for c in responses]
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


def lmer_many(formula: str, data: pd.DataFrame, responses, **kwargs) -> "ManyFits":
    """Fit `formula` to each of `responses` (a list of vectors, a 2-D array with one column per response, or a
    DataFrame, each with one value per row of `data`): a ManyFits, a sequence of LmerResults in order, with
    every response's estimates as one table (`ManyFits.estimates`). The formula's left-hand side names the
    response in the results (it need not be a column of `data`). The design is read once and the first response
    fitted as `lmer(formula, data, **kwargs)` would; the others are fitted together from its theta (batched Newton
    steps, fit/many.py) where the system is small enough to be held dense, and as `refit(y)` of the first fit
    where not, or where a response's optimum is near a boundary. Rows that `lmer` drops for missing values in the
    model's other variables are dropped from every response; the responses must be complete in the rows kept."""
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
    rows = _fitted_positions(data, first)
    others = _checked_responses(columns[1:], rows, first.nobs)
    names = list(responses.columns) if isinstance(responses, pd.DataFrame) else list(range(len(columns)))
    return ManyFits(first, others, names)


def _checked_responses(columns: list, rows: np.ndarray, n: int) -> list[np.ndarray]:
    """The responses after the first on the fitted rows, checked as refit's response_vector checks one: where they
    are all numbers, the checks run on them as one matrix, and only a column that fails one goes through
    response_vector (which says what is wrong with it); otherwise one by one."""
    named = lambda i: f"response {i}"  # noqa: E731
    if not columns or not all(np.asarray(c).dtype.kind in "iuf" for c in columns):
        return [response_vector(c[rows], n, named(i)) for i, c in enumerate(columns, start=1)]
    Y = np.column_stack([np.asarray(c, dtype=float)[rows] for c in columns])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        big = np.max(np.abs(Y), axis=0)
        spread = np.std(Y / big, axis=0) * big
        good = (
            np.isfinite(Y).all(axis=0)
            & (np.ptp(Y, axis=0) > 0)
            & (big <= checks.RESPONSE_SCALE_LIMIT)
            & (spread >= 1 / checks.RESPONSE_SCALE_LIMIT)
        )
    for j in np.flatnonzero(~good):
        response_vector(Y[:, j], n, named(j + 1))  # raises, naming the response and the problem
    return list(Y.T)


class ManyFits(Sequence):
    """lmer_many's result: one LmerResults per response, in order (those the batched steps fitted are built on
    first use: the estimates are known, the rest of a results object costs a solve), and `estimates`, every
    response's sd/cor parameters, sigma, fixed effects and log-likelihood as one DataFrame."""

    def __init__(self, first: LmerResults, others: list[np.ndarray], names: list):
        self.names = names
        self._first = first
        self._ys = [first.design.y] + others
        self._fits: list[LmerResults | None] = [first] + [None] * len(others)
        self._batched: dict[int, int] = {}  # response -> its column in the batched fit
        fit = first.fit_result
        system = fit.system
        with fit_threads():
            if others and batched_applies(system, fit.optimization.method):
                design = first.design
                columns = system_columns(list(design.terms), system.relcov.column_transforms)
                Y = np.column_stack(others) - design.offset[:, None]
                sums = system.cross.response_sums(design.X, columns, Y, design.weights)
                found = fit_responses(system, sums, fit.theta, fit.reml)
                self._found, self._sums = found, sums
                self._batched = {j + 1: j for j in np.flatnonzero(found.settled)}
            # the others as refit(y) gives them (from the first fit's theta: a start where the batched steps
            # stopped, near a boundary, once led L-BFGS-B to a flat point 1e-5 below the optimum)
            for i in range(1, len(self._ys)):
                if i not in self._batched:
                    self._fits[i] = first.refit(self._ys[i])

    def _build(self, i: int) -> LmerResults:
        """The results of a response the batched steps fitted: solved at their theta by the one pipeline's end."""
        j, found, (Zty, Xty, yty, beta_ols) = self._batched[i], self._found, self._sums
        first = self._first
        fit = first.fit_result
        cross = replace(fit.system.cross, Zty=Zty[:, j], Xty=Xty[:, j], yty=float(yty[j]), beta_ols=beta_ols[:, j])
        message = "batched Newton steps (lmer_many)"
        opt = OptimizationResult(
            found.theta[j], float(found.deviance[j]), 0, True, message, GRADIENT_METHOD, found.seconds
        )
        with fit_threads():
            new = finish_fit(fit.system.with_response(cross), opt, fit.reml, None, first.theta_names)
        return LmerResults(replace(first.design, y=self._ys[i]), new)

    def __len__(self) -> int:
        return len(self._ys)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # IndexError, negative indices
        if self._fits[i] is None:
            self._fits[i] = self._build(i)
        return self._fits[i]

    @property
    def batched(self) -> np.ndarray:
        """Which responses the batched Newton steps fitted (the others went through refit)."""
        return np.array([i in self._batched for i in range(len(self))])

    @property
    def estimates(self) -> pd.DataFrame:
        """One row per response (indexed by the responses' names): lme4's sd/cor parameters and sigma
        (sdcor_names), the fixed effects, the log-likelihood (REML or ML, as fitted) and whether it converged."""
        first = self._first
        relcov = first.fit_result.system.relcov
        rows = []
        for i in range(len(self)):
            if self._fits[i] is None:  # not built: the batched steps' own numbers
                j, found = self._batched[i], self._found
                theta, beta, sigma2 = found.theta[j], found.beta[j], found.sigma2[j]
                llf, converged = -0.5 * found.deviance[j], True
            else:
                fit = self[i].fit_result
                theta, beta, sigma2, llf, converged = fit.theta, fit.beta, fit.sigma2, fit.llf, fit.converged
            rows.append(np.concatenate([sdcor_of(relcov, theta, float(np.sqrt(sigma2))), beta, [llf, converged]]))
        columns = first.sdcor_names + list(first.design.fe_names) + ["llf", "converged"]
        out = pd.DataFrame(np.array(rows), index=self.names, columns=columns)
        return out.astype({"converged": bool})


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
