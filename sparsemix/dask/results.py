"""Results of a fit from a Dask DataFrame: what needs only the cross-products is computed on the client as for
any LmerResults; what needs the rows (fitted values, residuals, predictions, simulated responses) runs on the
cluster, partition by partition, and comes back as Dask collections (or, for the bootstrap, as sums)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import checks
from ..core.system import PenalizedSystem
from ..errors import InputError
from ..fit.stages import optimize_system
from ..inference.sdcor import sdcor_of
from ..lme4.results import LmerResults
from ..fit.optimize import warm_step
from .fit import _add, _partition_Z, _rows, _tree, _design_matrix

__all__ = ["PartitionedLmerResults"]

BOOTSTRAP_BATCH = 50      # replicates simulated per pass over the data (n_rows x 50 floats per partition)


class PartitionedLmerResults(LmerResults):
    """LmerResults whose rows live on a Dask cluster (`design.data`)."""

    @property
    def fitted(self):
        """Fitted values (fixed + random effects + offset) as a Dask Series, on the complete rows."""
        return self.design.data.map_partitions(_fitted_partition, self.design.spec, self.fit_result.beta,
                                               self.fit_result.b, False, meta=(None, "f8"))

    @property
    def resid(self):
        return self.design.data.map_partitions(_fitted_partition, self.design.spec, self.fit_result.beta,
                                               self.fit_result.b, True, meta=(None, "f8"))

    def predict(self, newdata=None, include_random: bool = True, allow_new_levels: bool = True, offset=None):
        """Predictions for the fitted rows (newdata None) or new data: a Dask Series for a Dask DataFrame, a
        pandas Series for a pandas one. New levels get the population-level prediction when allowed."""
        include_random = checks.check_bool(include_random, "include_random")
        allow_new_levels = checks.check_bool(allow_new_levels, "allow_new_levels")
        if newdata is None:
            newdata = self.design.data
        if offset is not None and not isinstance(offset, str):
            raise InputError("with partitioned results, offset must be a column name of newdata.")
        args = (self.design.spec, self.fit_result.beta, self.fit_result.b if include_random else None,
                allow_new_levels, offset)
        if hasattr(newdata, "map_partitions"):
            return newdata.map_partitions(_predict_partition, *args, meta=(None, "f8"))
        return _predict_partition(newdata, *args)

    def simulate(self, nsim: int = 1, seed=None):
        raise InputError("simulate() would bring n x nsim values to the client; with Dask data use bootstrap(), "
                         "which simulates on the workers and returns only the refits' estimates.")

    def _scaled_residual_quantiles(self) -> np.ndarray:
        """Min, quartiles and max of the scaled residuals; the quartiles are Dask's approximate quantiles."""
        r = self.design.data.map_partitions(_scaled_residual_partition, self.design.spec, self.fit_result.beta,
                                            self.fit_result.b, self.sigma, meta=(None, "f8"))
        return np.asarray(r.quantile([0, 0.25, 0.5, 0.75, 1]).compute(), dtype=float)

    def refit_ml(self) -> "LmerResults":
        ml = super().refit_ml()
        return ml if ml is self else PartitionedLmerResults(self.design, ml.fit_result)

    def bootstrap(self, nsim: int = 500, seed=None, n_jobs=None) -> pd.DataFrame:
        """Parametric bootstrap on the cluster: each pass simulates a batch of responses partition by partition
        (every partition and replicate with its own seed) and returns only Z'y*, X'y*, y*'y*; the refits then
        run as Dask tasks, one per replicate. `n_jobs` is ignored (the cluster decides)."""
        from dask import compute, delayed

        fit, spec = self.fit_result, self.design.spec
        system = fit.system
        relcov, theta = system.relcov, fit.theta
        factors = relcov.factors(theta)
        sigma = float(np.sqrt(fit.sigma2))
        seeds = np.random.SeedSequence(seed).spawn(int(nsim))
        tasks = []
        for start in range(0, int(nsim), BOOTSTRAP_BATCH):
            batch = seeds[start:start + BOOTSTRAP_BATCH]
            # The random effects of each replicate are drawn here (q values each); the noise on the workers.
            B = np.column_stack([relcov.apply(factors, np.random.default_rng(s).standard_normal(relcov.q))
                                 for s in batch])
            entropy = [s.entropy for s in batch]
            sums = _tree(self.design.data, _simulated_sums, _add, spec, fit.beta, B, sigma, entropy,
                         [s.spawn_key for s in batch]).compute()
            for j in range(len(batch)):
                cross = _response_cross(system.cross, sums["ZtY"][:, j], sums["XtY"][:, j], float(sums["yty"][j]))
                tasks.append(delayed(_refit)(cross, relcov, theta, fit.reml))
        draws = compute(*tasks)
        return pd.DataFrame(np.array(draws), columns=self.sdcor_names + list(self.design.fe_names))


def _response_cross(cross, ZtY, XtY, yty):
    """The fit's cross-products with another response (its sums given), the least-squares shift taken out."""
    from dataclasses import replace

    beta0 = np.linalg.solve(cross.XtX, XtY) if cross.p else np.zeros(0)
    Ztr = ZtY - cross.ZtX @ beta0
    Xtr = XtY - cross.XtX @ beta0
    rtr = float(yty - 2 * beta0 @ XtY + beta0 @ cross.XtX @ beta0)
    return replace(cross, Zty=Ztr, Xty=Xtr, yty=rtr, beta_ols=beta0)


def _refit(cross, relcov, theta, reml) -> np.ndarray:
    system = PenalizedSystem(cross, relcov)
    opt = optimize_system(system, reml=reml, start_theta=theta, initial_step=warm_step(theta), polish=False)
    sol = system.solve(opt.theta, reml)
    return np.concatenate([sdcor_of(relcov, opt.theta, np.sqrt(sol.sigma2)), sol.beta])


# -- on the workers ---------------------------------------------------------------------------------------

def _fitted_partition(part, spec, beta, b, residual):
    y, X, _, frame = _rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    Z = _partition_Z(frame, spec)
    fit = X @ beta + Z @ b
    off = np.zeros(len(frame)) if spec.offset is None else frame[spec.offset].to_numpy(dtype=float)
    return pd.Series(y - fit if residual else fit + off, index=frame.index)


def _scaled_residual_partition(part, spec, beta, b, sigma):
    y, X, w, frame = _rows(part, spec)
    r = (y - X[:, list(spec.keep_columns)] @ beta - _partition_Z(frame, spec) @ b) / sigma
    return pd.Series(r if w is None else r * np.sqrt(w), index=frame.index)


def _predict_partition(part, spec, beta, b, allow_new_levels, offset):
    X = _design_matrix(part, spec)[:, list(spec.keep_columns)]
    pred = X @ beta
    if b is not None:
        pred = pred + _partition_Z(part, spec, allow_new_levels=allow_new_levels) @ b
    if offset is not None:
        pred = pred + part[offset].to_numpy(dtype=float)
    return pd.Series(pred, index=part.index)


def _simulated_sums(part, spec, beta, B, sigma, entropy, spawn_keys):
    _, X, w, frame = _rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    Z = _partition_Z(frame, spec)
    first = int(frame.index[0]) if len(frame) and np.issubdtype(frame.index.dtype, np.integer) else 0
    Y = np.empty((len(frame), B.shape[1]))
    mean = X @ beta
    for j, (e, key) in enumerate(zip(entropy, spawn_keys)):
        # Noise seeded by (replicate, position of the partition's first row): the same draws wherever it runs.
        rng = np.random.default_rng(np.random.SeedSequence(e, spawn_key=tuple(key) + (first,)))
        noise = rng.standard_normal(len(frame))
        Y[:, j] = mean + sigma * (Z @ B[:, j] + (noise if w is None else noise / np.sqrt(w)))
    Z = _partition_Z(frame, spec, working=True)        # the refit's cross-products are the system's
    if w is not None:
        sw = np.sqrt(w)
        X, Y, Z = X * sw[:, None], Y * sw[:, None], sp.csc_matrix(sp.diags(sw) @ Z)
    return {"ZtY": np.asarray(Z.T @ Y), "XtY": X.T @ Y, "yty": np.sum(Y * Y, axis=0)}
