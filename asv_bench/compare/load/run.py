"""sparsemix and lme4 on a machine that is not idle: fit times with 0, 1 and 2 CPU-bound processes beside them.

Usage: python asv_bench/compare/load/run.py DATA_DIR [--busy 0 1 2] [--no-lme4] [--repeats 3]
DATA_DIR holds insteval.csv (lme4's InstEval) and slopes1m.csv, written by asv_bench/compare/scale/export_data.sh;
the seed designs (sparsemix.datasets) are written there as CSV for both programs. Each row: the design, the
number of busy processes, sparsemix's times for `repeats` fits in one fresh process (as a user's loop runs
them) and lme4's for one fit. Busy processes are `while True: pass` loops, started before and killed after each
measurement.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LME4 = HERE.parent / "scale" / "lme4_fit.R"
DESIGNS = {
    "insteval": ("insteval.csv", "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)", "s,d,dept,service"),
    "slopes1m": ("slopes1m.csv", "y ~ 1 + x + (1 + x | a) + (1 | b)", ""),
    "seed_crossed": ("seed_crossed.csv", "y ~ 1 + (1 | group1) + (1 | group2)", "group1,group2"),
    "seed_nested": ("seed_nested.csv", "y ~ 1 + (1 | group1) + (1 | group1:group2)", "group1,group2"),
}
SEEDS = {"seed_nested": 0, "seed_crossed": 1}  # positions in sparsemix.datasets.seed_datasets()
SPARSEMIX = """
import json, sys, time
import pandas as pd
import sparsemix
path, formula, chars, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = pd.read_csv(path, dtype={c: str for c in chars.split(",") if c})
seconds = []
for _ in range(repeats):
    t = time.perf_counter(); m = sparsemix.lmer(formula, data); seconds.append(time.perf_counter() - t)
print(json.dumps({"seconds": seconds, "REMLcrit": m.deviance}))
"""


def busy(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(command, n_busy):
    loops = busy(n_busy)
    try:
        time.sleep(1.0)  # let the scheduler see them
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in loops:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--designs", nargs="+", default=["insteval", "seed_crossed", "seed_nested", "slopes1m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-lme4", action="store_true")
    args = ap.parse_args()
    for name in args.designs:
        file, formula, chars = DESIGNS[name]
        path = Path(args.data_dir) / file
        if name in SEEDS and not path.exists():  # both programs read the same file, groups as labels
            from sparsemix.datasets import seed_datasets

            seed_datasets()[SEEDS[name]].to_csv(path, index=False)
        path = str(path)
        for n_busy in args.busy:
            ours = measure([sys.executable, "-c", SPARSEMIX, path, formula, chars, str(args.repeats)], n_busy)
            row = {"design": name, "busy": n_busy, "sparsemix_seconds": [round(s, 3) for s in ours["seconds"]]}
            if not args.no_lme4:
                theirs = measure(["Rscript", str(LME4), path, formula] + ([chars] if chars else []), n_busy)
                row["lme4_seconds"] = theirs["seconds"]
                row["ratio_median"] = round(theirs["seconds"] / sorted(ours["seconds"])[len(ours["seconds"]) // 2], 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
