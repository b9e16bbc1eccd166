"""The `sparsemix` command: fit lme4-style models to CSV or Parquet files from batch scripts.

    sparsemix fit DATA --formula "y ~ x + (1 + x | g)" [--ml] [--weights COL] [--offset COL]
                  [--format text|json|markdown] [--output FILE] [--quiet] [--debug]
    sparsemix anova DATA --formula F1 --formula F2 [...]

Exit codes: 0 fitted (and converged), 1 fitted but the optimizer did not converge, 2 a usage or input error,
reported as one line on standard error (with the traceback only under --debug). The JSON output is documented
in docs/cli.md; its keys are stable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

from .errors import ConvergenceWarning, SparsemixError, require_extra
from .progress import ProgressPrinter

__all__ = ["main", "read_table", "fit_record", "markdown_report"]

EXIT_OK, EXIT_NOT_CONVERGED, EXIT_INPUT = 0, 1, 2
PARQUET_SUFFIXES = (".parquet", ".pq")


class CommandError(Exception):
    """A problem with the command line or the input file: one line for the user, exit code 2."""


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)        # usage errors: argparse prints the usage and exits with 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # our own warnings are reported below, one line each
            return args.run(args)
    except (CommandError, SparsemixError, OSError) as exc:
        if args.debug:
            raise
        print(f"sparsemix: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemix", description="Fit linear mixed models (lme4 formulas) to "
                                     "a CSV or Parquet file.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit one model and print its summary, JSON or markdown")
    fit.add_argument("--formula", required=True, help='lme4 formula, e.g. "y ~ x + (1 + x | g) + (1 | h)"')
    fit.add_argument("--weights", metavar="COL", help="column of prior weights")
    fit.add_argument("--offset", metavar="COL", help="column added to the linear predictor")
    fit.add_argument("--dask", metavar="SCHEDULER", nargs="?", const="local",
                     help="fit on a Dask cluster: DATA may then be Parquet files or a glob ('data/*.parquet'); give "
                          "the scheduler's address, or nothing for a local cluster (needs sparsemix[dask])")
    fit.set_defaults(run=_run_fit)
    anova = sub.add_parser("anova", help="likelihood-ratio tests between nested models (refitted by ML)")
    anova.add_argument("--formula", required=True, action="append", help="a formula; give two or more")
    anova.set_defaults(run=_run_anova)
    for p in (fit, anova):
        p.add_argument("data", metavar="DATA", help="a .csv or .parquet file, or - for CSV on standard input")
        p.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
        p.add_argument("--maxiter", type=int, default=10_000, help="most deviance evaluations (default 10000)")
        p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
        p.add_argument("--output", metavar="FILE", help="write the report here instead of standard output")
        p.add_argument("--quiet", action="store_true", help="no progress and no warnings on standard error")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


# -- commands --------------------------------------------------------------------------------------------

def _run_fit(args) -> int:
    if args.dask:
        return _run_fit_dask(args)
    fit, seconds = _fit(args, read_table(args.data))
    _write(_render(fit, seconds, args), args.output)
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


def _fit(args, data):
    """lmer on `data` as the options ask; warnings go to standard error. Returns (fit, seconds)."""
    from .lmer import lmer

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = lmer(args.formula, data, reml=not args.ml, weights=args.weights, offset=args.offset,
                   maxiter=args.maxiter, progress=_progress(args), eval_env={})   # the fixed list only
    seconds = time.perf_counter() - t0
    _report_warnings(caught, args)
    return fit, seconds


def _render(fit, seconds, args) -> str:
    if fit.design.n_dropped and not args.quiet:
        print(f"sparsemix: note: {fit.design.n_dropped} row(s) with missing values dropped", file=sys.stderr)
    if args.format == "json":
        return json.dumps(fit_record(fit, seconds), indent=2) + "\n"
    if args.format == "markdown":
        return markdown_report(fit)
    return str(fit.summary()) + "\n"


def _run_fit_dask(args) -> int:
    """The same fit, with the rows read and summed by Dask workers (only cross-products reach this process)."""
    dd = require_extra("dask.dataframe", "dask", "--dask")
    distributed = require_extra("distributed", "dask", "--dask")
    path = args.data
    if path == "-":
        raise CommandError("--dask reads files (Parquet or CSV), not standard input")
    try:
        data = dd.read_parquet(path) if not path.lower().endswith(".csv") else dd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {path} with Dask: {_one_line(exc)}") from None
    cluster = distributed.LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1) \
        if args.dask == "local" else None
    with distributed.Client(cluster if cluster is not None else args.dask):
        fit, seconds = _fit(args, data)
        text = _render(fit, seconds, args)         # (the summary's residual quantiles need the cluster)
    if cluster is not None:
        cluster.close()
    _write(text, args.output)
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


def _run_anova(args) -> int:
    from .inference.anova import anova
    from .lmer import lmer

    if len(args.formula) < 2:
        raise CommandError("anova needs at least two --formula options to compare")
    data = _complete_for(args.formula, read_table(args.data), args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = [lmer(f, data, reml=not args.ml, maxiter=args.maxiter, progress=_progress(args),
                     eval_env={}) for f in args.formula]
        table = anova(*fits, names=[f"m{i + 1}" for i in range(len(fits))])
    _report_warnings(caught, args)
    if args.format == "json":
        rows = [{"model": name, "formula": args.formula[int(name[1:]) - 1],
                 **{k: _number(v) for k, v in row.items()}} for name, row in table.iterrows()]
        text = json.dumps({"refitted_with_ml": bool(table.attrs.get("refit")), "models": rows}, indent=2) + "\n"
    else:
        formulas = "\n".join(f"m{i + 1}: {f}" for i, f in enumerate(args.formula))
        body = _markdown_table(table.reset_index(names="model")) if args.format == "markdown" else \
            table.to_string(float_format=lambda v: f"{v:.4g}")
        note = "\n(REML fits were refitted with ML for the comparison)" if table.attrs.get("refit") else ""
        text = f"{formulas}\n\n{body}{note}\n"
    _write(text, args.output)
    return EXIT_OK if all(f.converged for f in fits) else EXIT_NOT_CONVERGED


# -- input -----------------------------------------------------------------------------------------------

def read_table(path: str) -> pd.DataFrame:
    """A CSV file, a Parquet file (by suffix), or CSV from standard input for '-'."""
    if path != "-" and not os.path.exists(path):
        raise CommandError(f"no such file: {path}")
    if path.lower().endswith(PARQUET_SUFFIXES):
        require_extra("pyarrow", "parquet", "reading Parquet files")
        try:
            return pd.read_parquet(path)
        except Exception as exc:       # pyarrow's errors have no common base class
            raise CommandError(f"cannot read {path} as Parquet: {_one_line(exc)}") from None
    source = sys.stdin if path == "-" else path
    name = "standard input" if path == "-" else path
    try:
        data = pd.read_csv(source)
    except pd.errors.EmptyDataError:
        raise CommandError(f"{name} is empty: expected a CSV file with a header line and one row per "
                           "observation") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CommandError(f"{name} is not a well-formed CSV file: {_one_line(exc)}") from None
    if data.shape[0] == 0:
        raise CommandError(f"{name} has a header but no rows")
    return data


def _complete_for(formulas, data: pd.DataFrame, args) -> pd.DataFrame:
    """The rows complete in every column any of the formulas uses: models compared by a likelihood-ratio test
    must be fitted to the same rows."""
    from .formula.lme4 import parse_formula
    from .formula.mixedlm import formula_columns

    used = set()
    for f in formulas:
        parsed = parse_formula(f)
        used.update(formula_columns([parsed.fixed] + [r.expr for r in parsed.random], data.columns))
        used.update(name for r in parsed.random for name in r.group if name in data.columns)
    complete = data.dropna(subset=sorted(used, key=list(data.columns).index))
    if len(complete) < len(data) and not args.quiet:
        print(f"sparsemix: note: {len(data) - len(complete)} row(s) with missing values in a variable of some "
              "model dropped from every model", file=sys.stderr)
    return complete


def _progress(args):
    """Progress lines on standard error for long fits, unless --quiet or standard error is not a terminal."""
    return ProgressPrinter(every=2.0) if not args.quiet and sys.stderr.isatty() else None


def _report_warnings(caught, args):
    if args.quiet:
        return
    for w in caught:
        kind = "not converged" if issubclass(w.category, ConvergenceWarning) else "warning"
        print(f"sparsemix: {kind}: {_one_line(w.message)}", file=sys.stderr)


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- reports ---------------------------------------------------------------------------------------------

def fit_record(fit, seconds: float) -> dict:
    """The JSON record of a fit (keys documented in docs/cli.md)."""
    from . import __version__

    fe = fit.fixed_effects()
    vc = fit.variance_components()
    return {
        "formula": fit.design.formula,
        "method": "REML" if fit.reml else "ML",
        "nobs": int(fit.nobs),
        "n_dropped": int(fit.design.n_dropped),
        "ngroups": {k: int(v) for k, v in fit.ngroups.items()},
        "llf": _number(fit.llf),
        "aic": _number(fit.aic),
        "bic": _number(fit.bic),
        "converged": bool(fit.converged),
        "singular": bool(fit.is_singular),
        "fixed_effects": [{"name": name, "estimate": _number(r.estimate), "std_error": _number(r.std_error),
                           "df": _number(r.df), "t": _number(r.t), "p": _number(r.p)} for name, r in fe.iterrows()],
        "variance_components": [{"grp": r.grp, "var1": r.var1, "var2": r.var2, "vcov": _number(r.vcov),
                                 "sdcor": _number(r.sdcor)} for r in vc.itertuples()],
        "fit_seconds": round(seconds, 4),
        "sparsemix_version": __version__,
    }


def markdown_report(fit) -> str:
    fe = fit.fixed_effects().reset_index(names="term")
    vc = fit.variance_components()
    stats = pd.DataFrame({"statistic": ["method", "observations", "log-likelihood", "AIC", "BIC", "converged",
                                        "singular"],
                          "value": ["REML" if fit.reml else "ML", fit.nobs, f"{fit.llf:.4f}", f"{fit.aic:.2f}",
                                    f"{fit.bic:.2f}", fit.converged, fit.is_singular]})
    groups = ", ".join(f"{k} ({v} levels)" for k, v in fit.ngroups.items())
    return (f"**Model:** `{fit.design.formula}`; groups: {groups}\n\n### Fixed effects\n\n{_markdown_table(fe)}\n\n"
            f"### Variance components\n\n{_markdown_table(vc)}\n\n### Fit\n\n{_markdown_table(stats)}\n")


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _number(v):
    """A JSON number, or null for NaN/missing (JSON has no NaN)."""
    if v is None or v is pd.NA:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
