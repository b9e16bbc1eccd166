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


def table() -> str:
    """The side-by-side as a Markdown table (make compare's GLMM section)."""
    ours = {}
    for name, (key, formula) in MODELS.items():
        seconds, m = time_fit(pd.DataFrame(FIXTURES[key]["data"]), formula)
        ours[name] = (seconds, m.llf)
    lines = [
        "| model | sparsemix s | lme4 s | lme4 / sparsemix | log-lik sparsemix | log-lik lme4 | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    if shutil.which("Rscript") is None:
        return "lme4 not available (Rscript not found): skipped."
    out = subprocess.run(["Rscript", str(HERE / "glmer_fits.R")], capture_output=True, text=True, check=True)
    lme4 = json.loads(out.stdout.strip().splitlines()[-1])
    for name, row in lme4.items():
        base = name.removesuffix("_tight")
        label = f"{base} (lme4 with tolPwrss = 1e-12)" if name.endswith("_tight") else f"{base} (lme4's defaults)"
        seconds, llf = ours[base]
        lines.append(
            f"| {label} | {seconds:.4f} | {row['seconds']:.4f} | {row['seconds'] / seconds:.1f} | {llf:.6f} | "
            f"{row['logLik']:.6f} | {llf - row['logLik']:+.1e} |"
        )
    lines += [
        "",
        "glmer by the Laplace approximation, binomial; times are medians of 5 fits from a data frame in memory. "
        "lme4's defaults stop PIRLS early (tolPwrss 1e-7); with 1e-12 its log-likelihood reaches ours.",
    ]
    return "\n".join(lines)


def main():
    print(table())


if __name__ == "__main__":
    main()
