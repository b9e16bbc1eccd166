"""Target 4 of the performance issue: y ~ 1 + (1|user) + (1|item), REML, on a MovieLens-sized synthetic table.

Usage: python fit.py [n_rows n_users n_items]   (default 32,000,000 x 200,000 x 16,000; takes tens of minutes)
Prints the stages' times, the fit log as it goes, and a JSON line at the end. Run under /usr/bin/time -v for the
peak memory (the script's own report is the peak resident size of the process, from getrusage).
"""

import json
import resource
import sys
import time

import sparsemix
from sparsemix.datasets import generate_ratings

n, n_users, n_items = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (32_000_000, 200_000, 16_000)
t0 = time.perf_counter()
data = generate_ratings(n, n_users, n_items)
t_data = time.perf_counter() - t0
print(f"data: {n:,} rows, {n_users:,} users x {n_items:,} items in {t_data:.1f} s", flush=True)
t0 = time.perf_counter()
fit = sparsemix.lmer("y ~ 1 + (1 | user) + (1 | item)", data, verbose=True)
seconds = time.perf_counter() - t0
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(
    json.dumps(
        {
            "rows": n,
            "users": n_users,
            "items": n_items,
            "fit_seconds": round(seconds, 1),
            "evaluations": fit.n_evaluations,
            "converged": fit.converged,
            "REMLcrit": fit.deviance,
            "factorization": fit.fit_result.system.factorization_mode,
            "peak_rss_gb": round(peak_gb, 2),
            "theta": [float(t) for t in fit.theta],
        }
    ),
    flush=True,
)
print(fit.variance_components(), flush=True)  # (the full summary adds Satterthwaite's df: more evaluations)
