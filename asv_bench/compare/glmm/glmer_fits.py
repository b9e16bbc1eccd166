"""glmer side by side with lme4 (issue 17's speed targets): VerbAgg (7,584 rows, 316 x 24 crossed, Laplace) and
cbpp, each the median of five fits from a data frame; glmer_fits.R times lme4 on the same models in the same run.

Usage: python asv_bench/compare/glmm/glmer_fits.py   (runs the R script too when Rscript is on the PATH)
"""

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd

import sparsemix

HERE = Path(__file__).parent
FIXTURES = json.loads((HERE.parents[2] / "tests" / "reference" / "glmer.json").read_text())
MODELS = {
    "verbagg": ("VerbAgg", "y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"),
    "cbpp": ("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)"),
}


def time_fit(data, formula):
    times, m = [], None
    for _ in range(5):
        t0 = time.perf_counter()
        m = sparsemix.glmer(formula, data, family="binomial")
        times.append(time.perf_counter() - t0)
    return statistics.median(times), m


def main():
    ours = {}
    for name, (key, formula) in MODELS.items():
        seconds, m = time_fit(pd.DataFrame(FIXTURES[key]["data"]), formula)
        ours[name] = (seconds, m.llf)
        print(f"sparsemix {name}: {seconds:.3f} s, logLik {m.llf:.6f}")
    if shutil.which("Rscript") is None:
        print("lme4: Rscript not found, not run")
        return
    out = subprocess.run(["Rscript", str(HERE / "glmer_fits.R")], capture_output=True, text=True, check=True)
    lme4 = json.loads(out.stdout.strip().splitlines()[-1])
    for name, row in lme4.items():
        base = name.removesuffix("_tight")
        ratio, difference = row["seconds"] / ours[base][0], ours[base][1] - row["logLik"]
        print(
            f"lme4 {name}: {row['seconds']:.3f} s, logLik {row['logLik']:.6f}, {row['feval']} evaluations: "
            f"lme4 / sparsemix {ratio:.1f}x, log-likelihood difference (ours - lme4) {difference:+.1e}"
        )


if __name__ == "__main__":
    main()
