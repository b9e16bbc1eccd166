"""Usage: python sparsemix_fit.py data.csv FORMULA [character-columns]; prints seconds, REML criterion, evaluations."""

import json
import sys
import time

import pandas as pd

import sparsemix

path, formula = sys.argv[1], sys.argv[2]
chars = sys.argv[3].split(",") if len(sys.argv) > 3 else []
data = pd.read_csv(path, dtype={c: str for c in chars})
t0 = time.perf_counter()
m = sparsemix.lmer(formula, data)
print(
    json.dumps(
        {
            "seconds": round(time.perf_counter() - t0, 3),
            "REMLcrit": m.deviance,
            "feval": m.n_evaluations,
            "converged": m.converged,
            "factorization": m.fit_result.system.factorization_mode,
        }
    )
)
