"""The 1,000,000-row random-slopes design split into 16 Parquet files, fitted through a 2-worker LocalCluster
and in memory, side by side in one run. Prints a JSON line with both times and what reached the client.

Usage: python run.py [directory]   (default /tmp/sparsemix-dask; the files are written once)
"""

import json
import os
import sys
import time

import numpy as np

import sparsemix
from sparsemix.datasets import generate_crossed_slopes

FORMULA = "y ~ 1 + x + (1 + x | a) + (1 | b)"


def main(root):
    import dask.dataframe as dd
    import distributed

    data = generate_crossed_slopes()
    os.makedirs(root, exist_ok=True)
    if len([f for f in os.listdir(root) if f.endswith(".parquet")]) != 16:
        for i, rows in enumerate(np.array_split(np.arange(len(data)), 16)):
            data.iloc[rows].to_parquet(os.path.join(root, f"part-{i:02d}.parquet"))
    t0 = time.perf_counter()
    memory = sparsemix.lmer(FORMULA, data)
    t_memory = time.perf_counter() - t0
    del data
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster),
    ):
        t0 = time.perf_counter()
        ddf = dd.read_parquet(os.path.join(root, "*.parquet"))
        dask_fit = sparsemix.lmer(FORMULA, ddf)
        t_dask = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "rows": memory.nobs,
                "files": 16,
                "workers": 2,
                "in_memory_seconds": round(t_memory, 1),
                "dask_seconds": round(t_dask, 1),
                "bytes_to_client": dask_fit.design.transferred_bytes,
                "parquet_bytes": sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root)),
                "llf_in_memory": memory.llf,
                "llf_dask": dask_fit.llf,
                "relative_difference": abs(memory.llf - dask_fit.llf) / abs(memory.llf),
                "evaluations": [memory.n_evaluations, dask_fit.n_evaluations],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sparsemix-dask")
