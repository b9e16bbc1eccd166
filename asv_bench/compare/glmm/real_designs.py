"""glmer side by side with lme4 on published data sets that no part of sparsemix was tuned to (lme4's cbpp,
grouseticks, VerbAgg and Arabidopsis; mlmRev's Contraception, Mmmec and guImmun; MASS's bacteria and epil; R's esoph
and warpbreaks): real_designs.R writes each data set as CSV and times lme4 (median of `reps` fits, after one
untimed); this script times sparsemix.glmer on the same rows and formula, in the same run, and prints the table.

Usage: python asv_bench/compare/glmm/real_designs.py [--reps 5] [--out DIR] [--lme4 JSON (skip running R)]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

import sparsemix

HERE = Path(__file__).parent


def lme4_side(out: Path, reps: int) -> dict:
    run = subprocess.run(
        ["Rscript", str(HERE / "real_designs.R"), str(out), str(reps)], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout)


def time_fit(data: pd.DataFrame, formula: str, family: str, reps: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsemix.glmer(formula, data, family=family)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            m = sparsemix.glmer(formula, data, family=family)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), m


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="where the CSV files go (default: a temporary dir)")
    parser.add_argument("--lme4", type=Path, default=None, help="real_designs.R's JSON from an earlier run of it")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="sparsemix-glmm-"))
    reference = json.loads(args.lme4.read_text()) if args.lme4 else lme4_side(out, args.reps)
    print(
        "| data set | rows | formula | sparsemix s | evaluations | lme4 s | lme4 evaluations | lme4 / sparsemix "
        "| log-lik sparsemix - lme4 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ref in reference.items():
        factors = ref["factors"] if isinstance(ref["factors"], list) else [ref["factors"]]
        data = pd.read_csv(out / f"{name}.csv", dtype={c: str for c in factors})
        seconds, m = time_fit(data, ref["formula"], ref["family"], args.reps)
        formula_cell = ref["formula"].replace("|", "\\|")  # (a formula's bars are no column breaks)
        print(
            f"| {name} | {ref['rows']} | `{formula_cell}` ({ref['family']}) | {seconds:.4f} | {m.n_evaluations} "
            f"| {ref['seconds']:.3f} | {ref['feval']} | {ref['seconds'] / seconds:.1f} | {m.llf - ref['logLik']:+.1e} |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
