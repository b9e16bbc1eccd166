"""Fit the same models with sparsemix, statsmodels and lme4, side by side in one run on this machine.

Each library fits from a data frame already in memory to a fitted model; the time is the median of
`--reps` fits (statsmodels' slow crossed fit runs once); lme4's reference models take the lower of `--rounds`
such medians, the libraries alternating model by model. lme4 runs through Rscript when R and lme4 are
installed, and is skipped, with a note, when they are not. Prints a Markdown table of times, ratios and
log-likelihoods.

    python asv_bench/compare/compare.py [--reps 5] [--rounds 3] [--skip-statsmodels]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import sparsemix
from sparsemix.datasets import seed_datasets

HERE = Path(__file__).parent


@dataclass
class Case:
    name: str
    data: object
    formula: str
    groups: object  # column name, or "ones" for a single group
    re_formula: str | None
    vc_formula: dict | None
    lme4_formula: str

    def kwargs(self):
        groups = np.ones(len(self.data)) if self.groups == "ones" else self.groups
        return dict(groups=groups, re_formula=self.re_formula, vc_formula=self.vc_formula, data=self.data)


def seed_cases():
    nested, crossed = seed_datasets()
    return [
        Case(
            "seed nested (40,000 rows, 200 + 4,000 levels)",
            nested,
            "y ~ 1",
            "group1",
            "1",
            {"group2": "0 + C(group2)"},
            "y ~ 1 + (1|group1) + (1|group1:group2)",
        ),
        Case(
            "seed crossed (40,000 rows, 100 x 100 levels)",
            crossed,
            "y ~ 1",
            "ones",
            None,
            {"g1": "0 + C(group1)", "g2": "0 + C(group2)"},
            "y ~ 1 + (1|group1) + (1|group2)",
        ),
    ]


REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "reference"
# Fixtures that are no timing reference: the GLMMs (their own section: glmm/glmer_fits.py) and the formula-reading
# checks of R's functions (splines, relevel, %in%: tests/test_r_functions.py)
NOT_TIMED = {"glmer.json", "r_functions.json"}


@dataclass
class LmerCase:
    """An lme4 reference model: the same formula for sparsemix.lmer and lme4::lmer."""

    name: str
    data: object
    formula: str
    reml: bool
    weights: str | None = None
    offset: str | None = None


def reference_cases():
    """Every fit of the lme4 fixtures in tests/reference (the small data sets, and the seeds)."""
    nested, crossed = seed_datasets()
    out = []
    for path in sorted(REFERENCE.glob("*.json")):
        if path.name in NOT_TIMED:
            continue
        doc = json.loads(path.read_text())
        # one data set per file, or (random_slopes.json) several keyed by name, each with its data and fits
        entries = [doc] if "fits" in doc else [v for k, v in doc.items() if k != "versions"]
        for entry in entries:
            data = {"seed_nested": nested, "seed_crossed": crossed}.get(entry["dataset"])
            if data is None:
                data = pd.DataFrame(entry["data"])
            for fit in entry["fits"]:
                extra = {"weights": "w", "offset": "off"} if fit["name"] == "reml_weights_offset" else {}
                out.append(LmerCase(f"{entry['dataset']} {fit['name']}", data, fit["formula"], fit["reml"], **extra))
    return out


# sparsemix's fits are repeated for at least this long (a few-millisecond fit: ~30 times), its median then steadier
# against the host's bursts; lme4's keep `--reps` (its fits take 15-700 ms)
MIN_SECONDS = 0.1


def time_lmer(case, reps):
    """The median of at least `reps` fits (and of MIN_SECONDS of them) after one untimed fit (lme4_fit.R does the
    same with `reps`)."""
    times, res = [], None
    i = 0
    while i <= reps or sum(times) < MIN_SECONDS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sparsemix.lmer(case.formula, case.data, reml=case.reml, weights=case.weights, offset=case.offset)
        if i:
            times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times), float(res.llf)


def lme4_job(case, reps, workdir, index) -> str:
    """One line for lme4_fit.R --serve: `case`'s fit (its data written to a CSV of its own)."""
    csv = Path(workdir) / f"data{index}.csv"
    case.data.to_csv(csv, index=False, float_format="%.17g")
    factors = ",".join(c for c in case.data.columns if not pd.api.types.is_numeric_dtype(case.data[c]))
    fields = [str(csv), case.formula, "TRUE" if case.reml else "FALSE", str(reps), factors]
    return "\t".join(fields + [case.weights or "", case.offset or ""])


class Lme4Server:
    """One R process (lme4_fit.R --serve) that times the fit of each job line sent to it, one at a time: R's and
    lme4's start paid once, and nothing of R's running while sparsemix's fits are timed (it waits on its input)."""

    def __init__(self, workdir):
        self._log = Path(workdir) / "lme4_fit.log"  # (R's warnings: a pipe nobody read would fill and stall it)
        with open(self._log, "w") as log:
            self._proc = subprocess.Popen(
                ["Rscript", str(HERE / "lme4_fit.R"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )

    def time(self, job: str) -> dict:
        self._proc.stdin.write(job + "\n")
        self._proc.stdin.flush()
        while line := self._proc.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(
            f"lme4_fit.R stopped without a result for {job.split(chr(9))[1]!r}:\n{self._log.read_text()[-2000:]}"
        )

    def close(self):
        self._proc.stdin.close()
        self._proc.wait()


# a pause between the two libraries' timings: the other's last threads settle (an Rscript's exit just before one
# of ours slowed fits of a few milliseconds by a third or more)
SWITCH_PAUSE_SECONDS = 0.2


def run_reference(reps, rounds):
    lines = [
        "| model | sparsemix s | lme4 s | lme4 / sparsemix | log-lik sparsemix | log-lik lme4 | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = reference_cases()
    # The libraries alternate model by model (each round changes which goes first) and each keeps its lower median
    # of the rounds: this host's speed drifts by up to 2x over minutes, and a ratio of two timings taken a minute
    # apart (every sparsemix fit, then every lme4 fit) moved with it (mlmRev's Early, the same model and data as
    # early.json's, read 3.7-4.6x in the rounds where early.json's read 6.7x).
    ours: list = [None] * len(cases)
    theirs: list = [None] * len(cases)
    with tempfile.TemporaryDirectory() as workdir:
        jobs = [lme4_job(case, reps, workdir, i) for i, case in enumerate(cases)]
        server = Lme4Server(workdir)
        try:
            for r in range(rounds):
                for i, case in enumerate(cases):
                    for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                        time.sleep(SWITCH_PAUSE_SECONDS)
                        if side == "ours":
                            timed = time_lmer(case, reps)
                            ours[i] = timed if ours[i] is None or timed[0] < ours[i][0] else ours[i]
                        else:
                            ref = server.time(jobs[i])
                            theirs[i] = ref if theirs[i] is None or ref["seconds"] < theirs[i]["seconds"] else theirs[i]
        finally:
            server.close()
    for case, (ours_t, ours_llf), ref in zip(cases, ours, theirs):
        lines.append(
            f"| {case.name} | {ours_t:.4f} | {ref['seconds']:.4f} | {ref['seconds'] / ours_t:.1f} | "
            f"{ours_llf:.6f} | {ref['logLik']:.6f} | {ours_llf - ref['logLik']:+.1e} |"
        )
    lines.append("")
    lines.append(
        f"Times are the lower of {rounds} rounds' medians of {reps} fits (sparsemix's: of at least {reps} and "
        f"{MIN_SECONDS:g} s of them), each after one untimed fit, the libraries alternating model by model (each "
        "round changing which goes first), from a data frame in memory to a fitted model; same formula in both "
        "(`sparsemix.lmer`, `lme4::lmer`); sparsemix reads text columns as factors inside each fit, lme4 is given "
        "factor columns made before its timing."
    )
    return "\n".join(lines)


def time_python(module, case, reps):
    times, res = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = module.MixedLM.from_formula(case.formula, **case.kwargs()).fit()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(res.llf)


def time_lme4(case, reps, workdir):
    csv = Path(workdir) / "data.csv"
    case.data.to_csv(csv, index=False, float_format="%.17g")
    out = subprocess.run(
        ["Rscript", str(HERE / "lme4_fit.R"), str(csv), case.lme4_formula, "TRUE", str(reps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="reference models: rounds alternating the libraries")
    ap.add_argument("--skip-statsmodels", action="store_true")
    ap.add_argument(
        "--suite",
        choices=["seed", "reference", "all"],
        default="seed",
        help="seed: the notebook designs with three libraries; reference: every lme4 fixture model",
    )
    ap.add_argument("--output", help="also write the tables, with the machine and versions, to this Markdown file")
    args = ap.parse_args(argv)
    sections = []
    if args.suite in ("seed", "all"):
        sections.append(("Seed designs: sparsemix, statsmodels, lme4", run_seed(args)))
    if args.suite in ("reference", "all"):
        if shutil.which("Rscript") is None:
            sections.append(("lme4 reference models", "lme4 not available (Rscript not found): skipped."))
        else:
            sections.append(
                ("lme4 reference models: sparsemix.lmer and lme4::lmer", run_reference(args.reps, args.rounds))
            )
            sys.path.insert(0, str(HERE / "glmm"))
            import glmer_fits  # the GLMM side by side (asv_bench/compare/glmm)

            sections.append(("GLMMs: sparsemix.glmer and lme4::glmer", glmer_fits.table()))
    for title, table in sections:
        print(f"## {title}\n\n{table}\n")
    if args.output:
        Path(args.output).write_text(_report(sections))
    return sections


R_VERSION = ["Rscript", "-e", 'cat(R.version.string, "; lme4", as.character(packageVersion("lme4")))']


def _report(sections) -> str:
    import platform
    import subprocess as sp_

    def version(cmd):
        try:
            return sp_.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return "n/a"

    head = [
        "# Performance",
        "",
        "Written by `make compare` (`asv_bench/compare/compare.py --suite all`): every library fits the same "
        "models from the same data frame, side by side in one run on the same machine; ratios are what to "
        "read, since the machines are shared and absolute seconds move from run to run.",
        "",
        f"* date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {version(['git', 'rev-parse', '--short', 'HEAD'])}",
        f"* machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"* python {platform.python_version()}; sparsemix {sparsemix.__version__}; "
        f"R and lme4: {version(R_VERSION) or 'n/a'}",
        "",
    ]
    body = [f"## {title}\n\n{table}\n" for title, table in sections]
    return "\n".join(head + body + [_recorded_runs()])


def _recorded_runs() -> str:
    """The larger designs' last recorded runs (recorded.json): they take minutes to a quarter of an hour each."""
    recorded = json.loads((Path(__file__).parent / "recorded.json").read_text())
    lines = [
        "## Larger designs: recorded runs",
        "",
        recorded["note"],
        "",
        "| design | lme4 | sparsemix | lme4 / sparsemix | script, date, commit |",
        "|" + "---|" * 5,
    ]
    cell = lambda text: str(text).replace("|", "\\|")  # formulas' bars are not column breaks
    for run in recorded["runs"]:
        ratio = run["lme4_over_sparsemix"]
        lines.append(
            f"| {cell(run['design'])} | {cell(run['lme4'])} | {cell(run['sparsemix'])} | "
            f"{'n/a' if ratio is None else format(ratio, '.1f')} | "
            f"`{run['script']}`, {run['date']}, {run['commit']} |"
        )
    lines += [""] + [f"* {cell(run['spread'])}" for run in recorded["runs"] if "spread" in run]
    for section in recorded.get("sections", []):  # other recorded tables (their scripts named in their notes)
        lines += ["", f"## {section['title']}", "", section["note"], ""]
        lines += ["| " + " | ".join(section["columns"]) + " |", "|" + "---|" * len(section["columns"])]
        lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in section["rows"]]
    peers = recorded.get("peers")
    if peers:  # another Python library on the same fits: its own venv, so not run by this script
        lines += [
            "",
            f"## {peers['title']}",
            "",
            peers["note"],
            "",
            "| model | sparsemix ms | " + peers["library"] + " ms | sparsemix / " + peers["library"] + " |",
            "|" + "---|" * 4,
        ]
        for row in peers["rows"]:
            theirs = row["peer_ms"]
            timed = isinstance(theirs, (int, float))
            # (the paired ratio: the median of the rounds' ratios, where the run recorded it)
            ratio = format(row.get("ratio", row["sparsemix_ms"] / theirs), ".2f") if timed else "n/a"
            shown = format(theirs, ".2f") if timed else cell(theirs)
            lines.append(f"| {cell(row['model'])} | {row['sparsemix_ms']:.2f} | {shown} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_seed(args):
    have_r = shutil.which("Rscript") is not None
    try:
        import statsmodels.api as statsmodels
    except ImportError:
        statsmodels = None
    notes = []
    if not have_r:
        notes.append("lme4 skipped: Rscript not found")
    if statsmodels is None or args.skip_statsmodels:
        notes.append("statsmodels skipped")
        statsmodels = None
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in seed_cases():
            ours_t, ours_llf = time_python(sparsemix, case, args.reps)
            row = {"case": case.name, "sparsemix_s": ours_t, "sparsemix_llf": ours_llf}
            if statsmodels is not None:
                row["statsmodels_s"], row["statsmodels_llf"] = time_python(statsmodels, case, 1)
            if have_r:
                lme4 = time_lme4(case, args.reps, workdir)
                row["lme4_s"], row["lme4_llf"], row["lme4_blas"] = lme4["seconds"], lme4["logLik"], lme4["blas"]
            rows.append(row)
    return render(rows, args.reps, notes)


def render(rows, reps, notes):
    head = (
        "| model | sparsemix s | statsmodels s | lme4 s | statsmodels / sparsemix | lme4 / sparsemix | "
        "log-lik sparsemix | statsmodels | lme4 |"
    )
    lines = [head, "|" + "---|" * 9]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    for r in rows:
        sm_t, r_t = r.get("statsmodels_s"), r.get("lme4_s")
        lines.append(
            f"| {r['case']} | {r['sparsemix_s']:.3f} | {fmt(sm_t, '.3f')} | {fmt(r_t, '.3f')} | "
            f"{fmt(sm_t and sm_t / r['sparsemix_s'], '.1f')} | {fmt(r_t and r_t / r['sparsemix_s'], '.1f')} | "
            f"{r['sparsemix_llf']:.4f} | {fmt(r.get('statsmodels_llf'), '.4f')} | {fmt(r.get('lme4_llf'), '.4f')} |"
        )
    blas = {r.get("lme4_blas") for r in rows} - {None}
    lines.append("")
    lines.append(
        f"REML fits; times are medians of {reps} fits (statsmodels: 1; lme4's after one untimed fit), from a data "
        f"frame in memory to a fitted model. lme4 linked against {', '.join(blas) or 'n/a'}."
    )
    lines.extend(notes)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
