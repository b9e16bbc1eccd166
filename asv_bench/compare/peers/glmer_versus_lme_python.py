"""glmer side by side with lme-python (PyPI; a Rust back end with its own glmer), in its own venv on the same machine:
the glmer fixtures of tests/reference/glmer.json that it accepts (numeric columns, a plain response: not cbpp's
cbind()), each library in its own process, the median of `reps` fits after one untimed fit, the two alternating
round by round; the table shows each library's lower median over the rounds and its log-likelihood.

Usage: python asv_bench/compare/peers/glmer_versus_lme_python.py --peer-python /path/to/venv/bin/python
           [--reps 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "reference" / "glmer.json"
MODELS = [
    ("grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)", "poisson"),
    ("Contraception", "use01 ~ age + I(age^2) + urban + livch + (1 | district)", "binomial"),
    ("correlated", "y ~ x + (1 + x | g)", "binomial"),
    ("crossed_counts", "count ~ 1 + offset(logex) + (1 | subj) + (1 | item)", "poisson"),
]


def worker(library: str, reps: int) -> None:
    """Time every model with one library; print {model: [seconds, log-likelihood or None, error or None]}."""
    warnings.simplefilter("ignore")
    fixtures = json.loads(FIXTURES.read_text())
    if library == "sparsemix":
        import sparsemix

        def fit(formula, data, family):
            return float(sparsemix.glmer(formula, data, family=family).llf)

    else:
        import lme_python

        def fit(formula, data, family):
            return float(lme_python.glmer(formula, data, family).log_likelihood)

    out = {}
    for key, formula, family in MODELS:
        data = pd.DataFrame(fixtures[key]["data"])
        try:
            llf = fit(formula, data, family)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fit(formula, data, family)
                times.append(time.perf_counter() - t0)
            out[key] = [statistics.median(times), llf, None]
        except Exception as error:  # a model the library refuses: reported, not timed
            out[key] = [None, None, f"{type(error).__name__}: {error}"[:80]]
    print(json.dumps(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["sparsemix", "lme_python"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.reps)
        return
    pythons = {"sparsemix": sys.executable, "lme_python": args.peer_python}
    runs: dict[str, list] = {"sparsemix": [], "lme_python": []}
    for round_ in range(args.rounds):
        order = ["sparsemix", "lme_python"] if round_ % 2 == 0 else ["lme_python", "sparsemix"]
        for library in order:
            command = [pythons[library], __file__, "--peer-python", args.peer_python, "--worker", library]
            command += ["--reps", str(args.reps)]
            runs[library].append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
    print("| model | sparsemix ms | lme-python ms | sparsemix / lme-python | log-lik sparsemix | log-lik lme-python |")
    print("|---|---|---|---|---|---|")
    for key, formula, family in MODELS:
        ours = min(run[key][0] for run in runs["sparsemix"])
        peer = [run[key] for run in runs["lme_python"]]
        if peer[0][0] is None:
            print(
                f"| {key} `{formula}` | {1e3 * ours:.1f} | refused: {peer[0][2]} | n/a | "
                f"{runs['sparsemix'][0][key][1]:.6f} | n/a |"
            )
            continue
        theirs = min(p[0] for p in peer)
        print(
            f"| {key} `{formula}` ({family}) | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {ours / theirs:.2f} "
            f"| {runs['sparsemix'][0][key][1]:.6f} | {peer[0][1]:.6f} |"
        )


if __name__ == "__main__":
    main()
