"""lmer_many against sparsemix's own lmer in a loop on every lme4 reference model of tests/reference (REML and ML
where the document has both; random_slopes.json's growth curves): per model, NSIM responses simulated from its fit,
lmer_many over them (best of 3) and lmer on a data frame holding each of the first 50 (best of 3), in one process
one after the other. Prints one line a model: ms a fit each, their ratio, the share fitted together.

Usage: python asv_bench/compare/many/many_models.py [NSIM]
"""

import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

import sparsemix

REFERENCE = Path(__file__).resolve().parents[3] / "tests" / "reference"
DOCUMENTS = ("sleepstudy", "dyestuff", "dyestuff2", "penicillin", "pastes", "oats", "cake")
LOOP = 50


def models():
    for name in DOCUMENTS:
        doc = json.loads((REFERENCE / f"{name}.json").read_text())
        for fit in doc["fits"]:
            if "weights" not in fit["name"]:
                yield f"{name} {fit['name']}", pd.DataFrame(doc["data"]), fit["formula"], fit["reml"]
    for name, doc in json.loads((REFERENCE / "random_slopes.json").read_text()).items():
        for fit in doc.get("fits", []) if isinstance(doc, dict) else []:
            yield f"{name} {fit.get('name', '')}".strip(), pd.DataFrame(doc["data"]), fit["formula"], fit["reml"]


def best_of(run, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    nsim = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    warnings.simplefilter("ignore")  # singular simulated fits, lme4's convergence notes
    print(f"{'model':<28} {'lmer_many':>10} {'lmer loop':>10} {'ratio':>7} {'batched':>8}")
    for label, data, formula, reml in models():
        response = formula.split("~")[0].strip()
        model = sparsemix.lmer(formula, data, reml=reml)
        sims = model.simulate(nsim, seed=1)
        renamed = "y_ ~" + formula.split("~", 1)[1]
        many = lambda: sparsemix.lmer_many(renamed, data, sims, reml=reml)  # noqa: E731
        fits = many()
        per_many = best_of(many) / nsim
        ys = [sims.iloc[:, i].to_numpy() for i in range(LOOP)]
        loop = lambda: [sparsemix.lmer(formula, data.assign(**{response: y}), reml=reml) for y in ys]  # noqa: E731
        per_loop = best_of(loop) / LOOP
        print(
            f"{label:<28} {per_many * 1e3:>8.3f}ms {per_loop * 1e3:>8.2f}ms {per_loop / per_many:>6.1f}x "
            f"{fits.batched.mean():>7.1%}"
        )


if __name__ == "__main__":
    main()
