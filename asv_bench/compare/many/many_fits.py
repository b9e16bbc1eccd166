"""Many fits of one model, sparsemix's side (issue 16, target 2): a 10,000-replicate parametric bootstrap
(`confint(method="boot")`, one worker per core) and, per fit, `refit(y)`, `lmer_many` and `lmer` on a data frame
holding each new response, on lme4's sleepstudy with `Reaction ~ Days + (Days | Subject)`. many_fits.R times
lme4's bootMer, refit and lmer on the same model; run both one after the other.

Usage: python asv_bench/compare/many/many_fits.py [NSIM]
"""

import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

import sparsemix

FORMULA = "Reaction ~ Days + (Days | Subject)"
DATA = Path(__file__).resolve().parents[3] / "tests" / "reference" / "sleepstudy.json"


def per_fit(run, n, repeats=1) -> float:
    """Seconds a fit: `run` fits n, timed `repeats` times, the fastest (the host's noise only adds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / n


def main():
    nsim = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    warnings.simplefilter("ignore", sparsemix.SparsemixWarning)  # some simulated responses fit singular
    data = pd.DataFrame(json.loads(DATA.read_text())["data"])
    model = sparsemix.lmer(FORMULA, data)
    start = time.perf_counter()
    model.confint(method="boot", nsim=nsim, seed=1)
    print(f"confint(method='boot', nsim={nsim}): {time.perf_counter() - start:.2f} s")
    one_process = per_fit(lambda: model.bootstrap(nsim=500, seed=2, n_jobs=1), 500)
    print(f"bootstrap in one process: {one_process * 1e3:.2f} ms/replicate")
    sims = model.simulate(200, seed=3)
    responses = [sims.iloc[:, i].to_numpy() for i in range(sims.shape[1])]
    model.refit(responses[0])  # the first refit sets up what the next ones reuse
    print(f"refit: {per_fit(lambda: [model.refit(y) for y in responses], 200) * 1e3:.2f} ms a fit")
    many_sims = model.simulate(1000, seed=4)
    many = lambda: sparsemix.lmer_many("y ~ Days + (Days | Subject)", data, many_sims)
    print(f"lmer_many (1,000 responses, best of 3): {per_fit(many, 1000, 3) * 1e3:.3f} ms a fit")
    print(f"lmer_many, fitted together: {many().batched.mean():.1%} of the responses")
    loop = lambda: [sparsemix.lmer(FORMULA, data.assign(Reaction=y)) for y in responses[:100]]
    print(f"lmer in a loop (best of 3): {per_fit(loop, 100, 3) * 1e3:.2f} ms a fit")


if __name__ == "__main__":
    main()
