"""The `sparsemix` command: fit lme4-style models to CSV or Parquet files from batch scripts.

    sparsemix fit DATA --formula "y ~ x + (1 + x | g)" [--ml] [--weights COL] [--offset COL] [--sep C]
                  [--format text|json|markdown] [--output FILE] [--quiet] [--debug]
    sparsemix anova DATA --formula F1 --formula F2 [...]
    sparsemix compile

Exit codes: 0 fitted (and converged), 1 fitted but the optimizer did not converge, 2 a usage or input error,
3 an internal error (a bug); 2 and 3 are one line on standard error, with the traceback only under --debug;
141 (as for SIGPIPE) when the reader of standard output closed it.
The report never overwrites the input and is written atomically. The JSON output is documented in
docs/cli.md; its keys are stable.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import io
import json
import math
import os
import secrets
import stat
import sys
import time
import traceback
import warnings

import numpy as np
import pandas as pd

from .errors import ConvergenceWarning, MissingExtraError, SparsemixError, require_extra
from .progress import ProgressPrinter

__all__ = ["main", "read_table", "fit_record", "markdown_report"]

EXIT_OK, EXIT_NOT_CONVERGED, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # the reader of standard output left: the shell's code for a SIGPIPE death
PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab")
SEPARATOR_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "vertical bars"}


class CommandError(Exception):
    """A problem with the command line or the input file: one line for the user, exit code 2."""


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints the usage and exits with 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our own warnings are reported below, one line each
            _check_output(args)  # before the fit: a refused --output costs no fitting time
            code = args.run(args)
            sys.stdout.flush()  # here, not at exit: a closed pipe must be caught below
            return code
    # Exit 1 means "fitted, not converged" to batch scripts, so no error may leave with Python's default 1.
    except BrokenPipeError:
        # `sparsemix fit ... | head`: the reader has what it wanted; no message, and exit as `yes | head` does.
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except (CommandError, SparsemixError, MissingExtraError, OSError) as exc:
        return _fail(args, EXIT_INPUT, _one_line(exc))
    except RecursionError:
        # The one unbounded nesting a user controls is the formula (patsy parses 'a + b + ...' recursively).
        return _fail(
            args,
            EXIT_INPUT,
            "the formula is too long or too deeply nested to parse; use fewer terms "
            "(several hundred '+' terms exceed Python's recursion limit)",
        )
    except MemoryError:
        return _fail(
            args,
            EXIT_INPUT,
            "out of memory building or fitting the model: the data or the model "
            "matrices the formula asks for are too large for this machine",
        )
    except Exception as exc:  # a bug: its own code, so scripts can tell it from bad input
        return _fail(
            args,
            EXIT_INTERNAL,
            f"internal error: {type(exc).__name__}: {_one_line(exc)} (please report "
            "it" + ("" if args.debug else "; --debug shows the traceback") + ")",
        )


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file descriptor (a test's capture)
        pass


def _fail(args, code: int, message: str) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"sparsemix: error: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsemix", description="Fit linear mixed models (lme4 formulas) to a CSV or Parquet file."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit one model and print its summary, JSON or markdown")
    fit.add_argument("--formula", required=True, help='lme4 formula, e.g. "y ~ x + (1 + x | g) + (1 | h)"')
    fit.add_argument("--weights", metavar="COL", help="column of prior weights")
    fit.add_argument("--offset", metavar="COL", help="column added to the linear predictor")
    fit.add_argument(
        "--family",
        choices=("gaussian", "binomial", "poisson"),
        default="gaussian",
        help="the response's distribution: gaussian (lmer, the default), binomial or poisson (glmer)",
    )
    fit.add_argument("--link", help="glmer's link: logit (default), probit or cloglog for binomial; log for poisson")
    fit.add_argument(
        "--nAGQ", type=int, default=1, help="glmer: 1 (Laplace, the default), 0, or Gauss-Hermite nodes (one term)"
    )
    fit.add_argument(
        "--dask",
        metavar="SCHEDULER",
        nargs="?",
        const="local",
        help="fit on a Dask cluster: DATA may then be Parquet files or a glob ('data/*.parquet'); give "
        "the scheduler's address, or nothing for a local cluster (needs sparsemix[dask])",
    )
    fit.set_defaults(run=_run_fit)
    anova = sub.add_parser("anova", help="likelihood-ratio tests between nested models (refitted by ML)")
    anova.add_argument("--formula", required=True, action="append", help="a formula; give two or more")
    anova.set_defaults(run=_run_anova)
    compile_ = sub.add_parser(
        "compile",
        help="compile the numba kernels of small fits now (once per install; otherwise the first fits that need "
        "them start their compilation in the background and take numpy's path meanwhile)",
    )
    compile_.add_argument("--debug", action="store_true", help="show the traceback of an error")
    compile_.set_defaults(run=_run_compile, output=None)
    for p in (fit, anova):
        p.add_argument("data", metavar="DATA", help="a .csv or .parquet file, or - for CSV on standard input")
        p.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
        p.add_argument(
            "--maxiter", type=_positive_int, default=10_000, help="most deviance evaluations (default 10000)"
        )
        p.add_argument(
            "--sep",
            type=_separator,
            metavar="C",
            help="the CSV's field separator: ',' (default; tab for .tsv/.tab files), ';', tab, '|' ...",
        )
        p.add_argument(
            "--encoding", type=_encoding, default="utf-8", help="the CSV's text encoding (default utf-8), e.g. latin-1"
        )
        p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
        p.add_argument(
            "--output",
            metavar="FILE",
            help="write the report here instead of standard output (never "
            "over the input; written to a temporary file renamed into place)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress and no warnings on standard error")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of evaluations, got {text!r}")
    return value


def _separator(text: str) -> str:
    sep = {"tab": "\t", "\\t": "\t"}.get(text.lower(), text)  # a tab is hard to type in a shell
    if len(sep) != 1:
        raise argparse.ArgumentTypeError(f"must be one character (or 'tab'), got {text!r}")
    return sep


def _encoding(text: str) -> str:
    try:
        return codecs.lookup(text).name
    except LookupError:
        raise argparse.ArgumentTypeError(
            f"unknown encoding {text!r}; give a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None


# -- commands --------------------------------------------------------------------------------------------


def _run_compile(args) -> int:
    from .fit.warmup import compile_kernels

    compile_kernels()
    return EXIT_OK


def _run_fit(args) -> int:
    if args.dask:
        return _run_fit_dask(args)
    fit, seconds = _fit(args, read_table(args.data, sep=args.sep, encoding=args.encoding))
    _write(_render(fit, seconds, args), args.output)
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


def _fit(args, data):
    """lmer on `data` as the options ask; warnings go to standard error. Returns (fit, seconds)."""
    from .lme4.lmer import lmer

    t0 = time.perf_counter()
    family = getattr(args, "family", "gaussian")
    if family == "gaussian" and (getattr(args, "link", None) or getattr(args, "nAGQ", 1) != 1):
        raise CommandError("--link and --nAGQ are for --family binomial or poisson (glmer)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if family == "gaussian":
            fit = lmer(
                args.formula,
                data,
                reml=not args.ml,
                weights=args.weights,
                offset=args.offset,
                maxiter=args.maxiter,
                progress=_progress(args),
                eval_env={},
            )  # the fixed list only
        else:
            from .core.families import family_of
            from .lme4.glmer import glmer

            if getattr(args, "dask", None):
                raise CommandError("--dask fits linear models only; drop --family or --dask")
            fit = glmer(
                args.formula,
                data,
                family=family_of(family, args.link),
                weights=args.weights,
                offset=args.offset,
                nAGQ=args.nAGQ,
                maxiter=args.maxiter,
                eval_env={},
            )
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
        data = (
            dd.read_parquet(path)
            if not path.lower().endswith(".csv")
            else dd.read_csv(path, sep=args.sep or ",", encoding=args.encoding)
        )
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {path} with Dask: {_one_line(exc)}") from None
    cluster = (
        distributed.LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1) if args.dask == "local" else None
    )
    with distributed.Client(cluster if cluster is not None else args.dask):
        fit, seconds = _fit(args, data)
        text = _render(fit, seconds, args)  # (the summary's residual quantiles need the cluster)
    if cluster is not None:
        cluster.close()
    _write(text, args.output)
    return EXIT_OK if fit.converged else EXIT_NOT_CONVERGED


def _run_anova(args) -> int:
    from .inference.anova import anova
    from .lme4.lmer import lmer

    if len(args.formula) < 2:
        raise CommandError("anova needs at least two --formula options to compare")
    data = _complete_for(args.formula, read_table(args.data, sep=args.sep, encoding=args.encoding), args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = [
            lmer(f, data, reml=not args.ml, maxiter=args.maxiter, progress=_progress(args), eval_env={})
            for f in args.formula
        ]
        table = anova(*fits, names=[f"m{i + 1}" for i in range(len(fits))])
    _report_warnings(caught, args)
    if args.format == "json":
        rows = [
            {"model": name, "formula": args.formula[int(name[1:]) - 1], **{k: _number(v) for k, v in row.items()}}
            for name, row in table.iterrows()
        ]
        text = json.dumps({"refitted_with_ml": bool(table.attrs.get("refit")), "models": rows}, indent=2) + "\n"
    else:
        formulas = "\n".join(f"m{i + 1}: {f}" for i, f in enumerate(args.formula))
        body = (
            _markdown_table(table.reset_index(names="model"))
            if args.format == "markdown"
            else table.to_string(float_format=lambda v: f"{v:.4g}")
        )
        note = "\n(REML fits were refitted with ML for the comparison)" if table.attrs.get("refit") else ""
        text = f"{formulas}\n\n{body}{note}\n"
    _write(text, args.output)
    return EXIT_OK if all(f.converged for f in fits) else EXIT_NOT_CONVERGED


# -- input -----------------------------------------------------------------------------------------------


def read_table(path: str, sep: str | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """A CSV file, a Parquet file (by suffix), or CSV from standard input for '-'. `sep` None: a comma, or a tab
    for .tsv/.tab files."""
    if path != "-" and not os.path.exists(path):
        raise CommandError(f"no such file: {path}")
    if path.lower().endswith(PARQUET_SUFFIXES):
        require_extra("pyarrow", "parquet", "reading Parquet files")
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow's errors have no common base class
            raise CommandError(f"cannot read {path} as Parquet: {_one_line(exc)}") from None
    if sep is None:
        sep = "\t" if path.lower().endswith(TAB_SUFFIXES) else ","
    if path == "-":  # the bytes, not sys.stdin's text: its decoding errors are not pandas'
        raw = getattr(sys.stdin, "buffer", sys.stdin).read()
        name, source = "standard input", io.BytesIO(raw if isinstance(raw, bytes) else raw.encode(encoding))
    else:
        name, source = path, path
    try:
        data = pd.read_csv(source, sep=sep, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise CommandError(
            f"{name} is empty: expected a CSV file with a header line and one row per observation"
        ) from None
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"{name} is not {encoding} text (it has the byte 0x{exc.object[exc.start]:02x}); give "
            "its encoding with --encoding (e.g. --encoding latin-1) or save it as UTF-8"
        ) from None
    except pd.errors.ParserError as exc:
        raise CommandError(
            f"{name} is not a well-formed CSV file: {_one_line(exc)}{_separator_hint(_first_line(source), sep)}"
        ) from None
    if data.shape[1] == 1 and (hint := _separator_hint(str(data.columns[0]), sep)):
        raise CommandError(f"{name} has a single column, {str(data.columns[0])[:60]!r}{hint}")
    if data.shape[0] == 0:
        raise CommandError(f"{name} has a header but no rows")
    return data


def _first_line(source) -> str:
    if isinstance(source, io.BytesIO):
        return source.getvalue().split(b"\n", 1)[0].decode("utf-8", "replace")
    with open(source, encoding="utf-8", errors="replace") as f:
        return f.readline()


def _separator_hint(header: str, sep: str) -> str:
    """'; the header looks separated by semicolons: give --sep ';'', or '' when no other separator is in sight."""
    for other, what in SEPARATOR_NAMES.items():
        if other != sep and other in header:
            option = "tab" if other == "\t" else repr(other)
            return f"; the header looks separated by {what}: give --sep {option}"
    return ""


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
        print(
            f"sparsemix: note: {len(data) - len(complete)} row(s) with missing values in a variable of some "
            "model dropped from every model",
            file=sys.stderr,
        )
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


def _check_output(args) -> None:
    """Refuse an --output that is a directory, sits in a missing directory, or is the input file itself under any
    name (./data.csv, an absolute path, a symlink, a hard link: the same device and inode)."""
    output = args.output
    if output is None:
        return
    if os.path.isdir(output):
        raise CommandError(
            f"--output {output} is a directory; give a file name, such as {os.path.join(output, 'report.txt')}"
        )
    parent = os.path.dirname(os.path.realpath(output))
    if not os.path.isdir(parent):
        raise CommandError(f"cannot write --output {output}: the directory {parent} does not exist")
    if not os.path.exists(output):
        return  # a file that does not exist yet cannot be the input
    target = os.stat(output)
    for source in _input_paths(args):
        info = os.stat(source)
        inside = stat.S_ISDIR(info.st_mode) and os.path.realpath(output).startswith(
            os.path.join(os.path.realpath(source), "")
        )
        if inside or (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            raise CommandError(
                f"--output {output} is the input file {source}; writing the report there would destroy "
                "the data. Give another file name"
            )


def _input_paths(args) -> list[str]:
    """The input files as given: none for standard input; the files a --dask glob matches."""
    if args.data == "-":
        return []
    if getattr(args, "dask", None):
        return glob.glob(args.data) or [args.data]
    return [args.data] if os.path.exists(args.data) else []


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    target = os.path.realpath(output)  # through a symlink: the link stays, its target gets the report
    if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        with open(target, "w", encoding="utf-8") as f:  # /dev/null, a pipe: nothing to rename over
            f.write(text)
        return
    # A temporary file in the same directory, renamed over the target: a crash leaves the old file or the new
    # one, never half a report. O_EXCL with mode 0o666 honours the umask, as open(output, "w") would.
    folder, base = os.path.split(target)
    temp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "w", encoding="utf-8") as f:
            if os.path.exists(target):
                os.chmod(fd, stat.S_IMODE(os.stat(target).st_mode))  # an existing report keeps its permissions
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CommandError(f"cannot write --output {output}: {exc.strerror or _one_line(exc)}") from None
        raise


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- reports ---------------------------------------------------------------------------------------------


def fit_record(fit, seconds: float) -> dict:
    """The JSON record of a fit (keys documented in docs/cli.md)."""
    from . import __version__

    fe = fit.fixed_effects()
    vc = fit.variance_components()
    glmm = hasattr(fit, "family")
    extra = {"family": fit.family.name, "link": fit.family.link.name, "nAGQ": int(fit.nAGQ)} if glmm else {}
    return {
        "formula": fit.design.formula,
        "method": "REML" if fit.reml else "ML",
        **extra,
        "nobs": int(fit.nobs),
        "n_dropped": int(fit.design.n_dropped),
        "ngroups": {k: int(v) for k, v in fit.ngroups.items()},
        "llf": _number(fit.llf),
        "aic": _number(fit.aic),
        "bic": _number(fit.bic),
        "converged": bool(fit.converged),
        "singular": bool(fit.is_singular),
        "fixed_effects": [
            {
                "name": name,
                "estimate": _number(r.estimate),
                "std_error": _number(r.std_error),
                **({"z": _number(r.z)} if glmm else {"df": _number(r.df), "t": _number(r.t)}),
                "p": _number(r.p),
            }
            for name, r in fe.iterrows()
        ],
        "variance_components": [
            {"grp": r.grp, "var1": r.var1, "var2": r.var2, "vcov": _number(r.vcov), "sdcor": _number(r.sdcor)}
            for r in vc.itertuples()
        ],
        "fit_seconds": round(seconds, 4),
        "sparsemix_version": __version__,
    }


def markdown_report(fit) -> str:
    fe = fit.fixed_effects().reset_index(names="term")
    vc = fit.variance_components()
    stats = pd.DataFrame(
        {
            "statistic": ["method", "observations", "log-likelihood", "AIC", "BIC", "converged", "singular"],
            "value": [
                "REML" if fit.reml else "ML",
                fit.nobs,
                f"{fit.llf:.4f}",
                f"{fit.aic:.2f}",
                f"{fit.bic:.2f}",
                fit.converged,
                fit.is_singular,
            ],
        }
    )
    groups = ", ".join(f"{k} ({v} levels)" for k, v in fit.ngroups.items())
    return (
        f"**Model:** `{fit.design.formula}`; groups: {groups}\n\n### Fixed effects\n\n{_markdown_table(fe)}\n\n"
        f"### Variance components\n\n{_markdown_table(vc)}\n\n### Fit\n\n{_markdown_table(stats)}\n"
    )


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
