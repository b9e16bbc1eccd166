"""glmer at scale, sparsemix's side (issue 17's 1,000,000-row targets): a simulated crossed design, binary (logit)
or Poisson counts with an offset, `y ~ x + (1 | s) + (1 | i)`, fitted once; the data are written to CSV for
glmer_scale.R, which fits lme4 on the same rows (run them one after the other; /usr/bin/time -v for peak memory).

Usage: python asv_bench/compare/glmm/glmer_scale.py binary|poisson [ROWS SUBJECTS ITEMS] [--csv PATH]
"""

import argparse
import time

import numpy as np
import pandas as pd

import sparsemix


def simulate(kind: str, n: int, n_s: int, n_i: int) -> tuple[pd.DataFrame, str, str]:
    """(data, formula, family): seed 17 for binary, 18 for Poisson (the runs docs/performance-scale.md records)."""
    rng = np.random.default_rng(17 if kind == "binary" else 18)
    s, i, x = rng.integers(0, n_s, n), rng.integers(0, n_i, n), rng.normal(size=n)
    if kind == "binary":
        eta = -0.3 + 0.5 * x + rng.normal(0, 0.8, n_s)[s] + rng.normal(0, 0.5, n_i)[i]
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
        data = pd.DataFrame({"y": y, "x": x, "s": s.astype(str), "i": i.astype(str)})
        return data, "y ~ x + (1 | s) + (1 | i)", "binomial"
    exposure = rng.uniform(0.5, 2, n)
    eta = np.log(exposure) - 0.5 + 0.3 * x + rng.normal(0, 0.5, n_s)[s] + rng.normal(0, 0.3, n_i)[i]
    data = pd.DataFrame(
        {"y": rng.poisson(np.exp(eta)).astype(float), "x": x, "logex": np.log(exposure)}
        | {"s": s.astype(str), "i": i.astype(str)}
    )
    return data, "y ~ x + offset(logex) + (1 | s) + (1 | i)", "poisson"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["binary", "poisson"])
    ap.add_argument("sizes", nargs="*", type=int, default=[1_000_000, 20_000, 2_000])
    ap.add_argument("--csv", help="also write the data here, for glmer_scale.R")
    args = ap.parse_args()
    data, formula, family = simulate(args.kind, *args.sizes)
    if args.csv:
        data.to_csv(args.csv, index=False)
    start = time.perf_counter()
    m = sparsemix.glmer(formula, data, family=family)
    seconds = time.perf_counter() - start
    system = m.fit_result.system
    print(
        f"{args.kind} {args.sizes}: {seconds:.1f} s, logLik {m.llf:.6f}, {m.n_evaluations} evaluations, "
        f"{system.n_pirls} PIRLS iterations, theta {np.round(m.theta, 6)}, beta {np.round(m.fe_params.values, 6)}"
    )


if __name__ == "__main__":
    main()
