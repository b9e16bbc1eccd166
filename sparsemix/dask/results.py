"""Results of a fit from a Dask DataFrame: what needs only the cross-products is computed on the client as for
any LmerResults; what needs the rows (fitted values, residuals, predictions, simulated responses) runs on the
cluster, partition by partition, and comes back as Dask collections (or, for the bootstrap, as sums)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import checks
from ..errors import InputError
from ..inference.bootstrap import refit_estimates
from ..lme4.results import LmerResults
from .partitions import add_sums, fitted_partition, predict_partition, scaled_residual_partition, simulated_sums, tree

__all__ = ["PartitionedLmerResults"]

BOOTSTRAP_BATCH = 50  # replicates simulated per pass over the data (n_rows x 50 floats per partition)


class PartitionedLmerResults(LmerResults):
    """LmerResults whose rows live on a Dask cluster (`design.data`)."""

    @property
    def fitted(self):
        """Fitted values (fixed + random effects + offset) as a Dask Series, on the complete rows."""
        return self.design.data.map_partitions(
            fitted_partition, self.design.spec, self.fit_result.beta, self.fit_result.b, False, meta=(None, "f8")
        )

    @property
    def resid(self):
        return self.design.data.map_partitions(
            fitted_partition, self.design.spec, self.fit_result.beta, self.fit_result.b, True, meta=(None, "f8")
        )

    def predict(self, newdata=None, include_random: bool = True, allow_new_levels: bool = True, offset=None):
        """Predictions for the fitted rows (newdata None) or new data: a Dask Series for a Dask DataFrame, a
        pandas Series for a pandas one. New levels get the population-level prediction when allowed."""
        include_random = checks.check_bool(include_random, "include_random")
        allow_new_levels = checks.check_bool(allow_new_levels, "allow_new_levels")
        if newdata is None:
            newdata = self.design.data
        if offset is not None and not isinstance(offset, str):
            raise InputError("with partitioned results, offset must be a column name of newdata.")
        args = (
            self.design.spec,
            self.fit_result.beta,
            self.fit_result.b if include_random else None,
            allow_new_levels,
            offset,
        )
        if hasattr(newdata, "map_partitions"):
            return newdata.map_partitions(predict_partition, *args, meta=(None, "f8"))
        return predict_partition(newdata, *args)

    def simulate(self, nsim: int = 1, seed=None):
        raise InputError(
            "simulate() would bring n x nsim values to the client; with Dask data use bootstrap(), "
            "which simulates on the workers and returns only the refits' estimates."
        )

    def _scaled_residual_quantiles(self) -> np.ndarray:
        """Min, quartiles and max of the scaled residuals; the quartiles are Dask's approximate quantiles."""
        r = self.design.data.map_partitions(
            scaled_residual_partition,
            self.design.spec,
            self.fit_result.beta,
            self.fit_result.b,
            self.sigma,
            meta=(None, "f8"),
        )
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
            batch = seeds[start : start + BOOTSTRAP_BATCH]
            # The random effects of each replicate are drawn here (q values each); the noise on the workers.
            B = np.column_stack(
                [relcov.apply(factors, np.random.default_rng(s).standard_normal(relcov.q)) for s in batch]
            )
            entropy = [s.entropy for s in batch]
            sums = tree(
                self.design.data,
                simulated_sums,
                add_sums,
                spec,
                fit.beta,
                B,
                sigma,
                entropy,
                [s.spawn_key for s in batch],
            ).compute()
            for j in range(len(batch)):
                cross = system.cross.with_response_sums(sums["ZtY"][:, j], sums["XtY"][:, j], float(sums["yty"][j]))
                tasks.append(delayed(refit_estimates)(system.with_response(cross), theta, fit.reml))
        draws = compute(*tasks)
        return pd.DataFrame(np.array(draws), columns=self.sdcor_names + list(self.design.fe_names))
