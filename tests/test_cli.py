"""The `sparsemix` command: CSV, Parquet and standard input; text, JSON and markdown; exit codes and messages."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix import cli
from sparsemix.cli import main

JSON_KEYS = {
    "formula",
    "method",
    "nobs",
    "n_dropped",
    "ngroups",
    "llf",
    "aic",
    "bic",
    "converged",
    "singular",
    "fixed_effects",
    "variance_components",
    "fit_seconds",
    "sparsemix_version",
}
FORMULA = "y ~ x + (1 + x | g) + (1 | h)"


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(21)
    n = 400
    g, h, x = rng.integers(0, 12, n), rng.integers(0, 7, n), rng.normal(size=n)
    y = (
        1
        + 0.5 * x
        + rng.normal(size=12)[g]
        + 0.4 * x * rng.normal(size=12)[g]
        + rng.normal(size=7)[h]
        + rng.normal(size=n)
    )
    d = pd.DataFrame({"y": y, "x": x, "g": g, "h": h})
    d.loc[5, "x"] = np.nan
    return d


@pytest.fixture(scope="module")
def csv_path(frame, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "data.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def complete_csv(frame, tmp_path_factory):
    """No missing values: no note on standard error, so an error is its only line."""
    path = tmp_path_factory.mktemp("cli") / "complete.csv"
    frame.dropna().to_csv(path, index=False)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_the_documented_keys_and_the_fit(capsys, frame, csv_path):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--format", "json")
    assert code == 0
    record = json.loads(out)
    assert set(record) == JSON_KEYS
    direct = sparsemix.lmer(FORMULA, frame)
    assert record["method"] == "REML" and record["nobs"] == 399 and record["n_dropped"] == 1
    assert record["ngroups"] == {"g": 12, "h": 7}
    assert record["llf"] == pytest.approx(direct.llf, rel=1e-10)
    assert record["aic"] == pytest.approx(direct.aic, rel=1e-10)
    fe = direct.fixed_effects()
    assert [r["name"] for r in record["fixed_effects"]] == list(fe.index)
    np.testing.assert_allclose([r["estimate"] for r in record["fixed_effects"]], fe["estimate"], rtol=1e-10)
    np.testing.assert_allclose([r["df"] for r in record["fixed_effects"]], fe["df"], rtol=1e-8)
    vc = direct.variance_components()
    assert [(r["grp"], r["var1"], r["var2"]) for r in record["variance_components"]] == list(
        zip(vc.grp, vc.var1, vc.var2)
    )
    np.testing.assert_allclose([r["sdcor"] for r in record["variance_components"]], vc["sdcor"], rtol=1e-10)
    assert record["sparsemix_version"] == sparsemix.__version__
    assert "1 row(s) with missing values dropped" in err


def test_text_output_is_the_summary_and_ml_is_honoured(capsys, frame, csv_path):
    code, out, _ = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--ml")
    assert code == 0
    assert out.strip() == str(sparsemix.lmer(FORMULA, frame, reml=False).summary()).strip()
    assert "Linear mixed model fit by maximum likelihood" in out


def test_markdown_has_tables_with_the_estimates(capsys, frame, csv_path):
    code, out, _ = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--format", "markdown")
    assert code == 0
    fe = sparsemix.lmer(FORMULA, frame).fixed_effects()
    row = next(line for line in out.splitlines() if line.startswith("| x |"))
    assert float(row.split("|")[2]) == pytest.approx(fe.loc["x", "estimate"], rel=1e-3)
    assert "### Variance components" in out and "| Residual |" in out


def test_parquet_and_stdin_give_the_csv_fit(capsys, frame, csv_path, tmp_path):
    pytest.importorskip("pyarrow")  # the [parquet] extra
    parquet = tmp_path / "data.parquet"
    frame.to_parquet(parquet)
    _, out_csv, _ = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--format", "json")
    _, out_pq, _ = _run(capsys, "fit", parquet, "--formula", FORMULA, "--format", "json")
    proc = subprocess.run(
        [sys.executable, "-m", "sparsemix", "fit", "-", "--formula", FORMULA, "--format", "json"],
        input=csv_path.read_text(),
        capture_output=True,
        text=True,
        check=True,
    )
    llfs = [json.loads(o)["llf"] for o in (out_csv, out_pq, proc.stdout)]
    assert llfs[1] == pytest.approx(llfs[0], rel=1e-12) and llfs[2] == pytest.approx(llfs[0], rel=1e-12)


def test_output_file(capsys, csv_path, tmp_path):
    target = tmp_path / "report.json"
    code, out, _ = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--format", "json", "--output", target)
    assert code == 0 and out == ""
    assert json.loads(target.read_text())["nobs"] == 399


def test_not_converged_exits_with_1_and_says_so(capsys, csv_path):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--maxiter", "3", "--format", "json")
    assert code == 1
    assert json.loads(out)["converged"] is False
    assert "sparsemix: not converged:" in err


def test_progress_only_on_a_terminal_and_not_when_quiet(capsys, csv_path, monkeypatch):
    _, _, err = _run(capsys, "fit", csv_path, "--formula", FORMULA)
    assert "evaluation" not in err  # capsys' stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _, _, err = _run(capsys, "fit", csv_path, "--formula", FORMULA)
    assert "sparsemix: evaluation" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _, _, err = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--quiet")
    assert err == ""


def test_anova_table_matches_the_api(capsys, frame, csv_path):
    f0, f1 = "y ~ 1 + (1 | g) + (1 | h)", "y ~ x + (1 | g) + (1 | h)"
    code, out, err = _run(capsys, "anova", csv_path, "--formula", f0, "--formula", f1, "--format", "json")
    assert code == 0
    rows = json.loads(out)["models"]
    complete = frame.dropna()
    expected = sparsemix.anova(sparsemix.lmer(f0, complete), sparsemix.lmer(f1, complete))
    assert rows[1]["Chisq"] == pytest.approx(expected["Chisq"].iloc[1], rel=1e-8)
    assert rows[1]["Pr(>Chisq)"] == pytest.approx(expected["Pr(>Chisq)"].iloc[1], rel=1e-8)
    assert "dropped from every model" in err
    code, out, _ = _run(capsys, "anova", csv_path, "--formula", f0, "--formula", f1)
    assert code == 0 and "Pr(>Chisq)" in out and "refitted with ML" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('y,x,g\n1,2,3\n"4,5,6\n', "not a well-formed CSV file"),
        ("y,x,g\n", "has a header but no rows"),
    ],
)
def test_bad_files_exit_2_with_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code, out, err = _run(capsys, "fit", path, "--formula", "y ~ x + (1 | g)")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sparsemix: error:") and message in err


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y ~ xx + (1 | g)", "Did you mean 'x'?"),
        ("y ~ x + (1 | gg)", "Did you mean 'g'?"),
        ('y ~ __import__("os").system("echo hacked") + (1 | g)', "attribute"),
        ("y ~ x", "no random-effects term"),
    ],
)
def test_input_errors_exit_2_with_one_line(capsys, csv_path, formula, message):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", formula)
    assert code == 2 and out == "" and "hacked" not in out + err.split(":", 2)[0]
    assert err.count("\n") == 1 and message in err


def test_missing_file_and_usage_errors(capsys, tmp_path):
    code, _, err = _run(capsys, "fit", tmp_path / "nope.csv", "--formula", "y ~ 1 + (1 | g)")
    assert code == 2 and "no such file" in err
    with pytest.raises(SystemExit) as exc:
        main(["fit", "data.csv"])  # --formula missing: argparse's usage error
    assert exc.value.code == 2
    code, _, err = _run(capsys, "anova", tmp_path / "nope.csv", "--formula", "y ~ 1 + (1 | g)")
    assert code == 2


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, csv_path):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", "y ~ xx + (1 | g)", "--debug")
    assert code == 2 and out == ""
    assert err.startswith("Traceback (most recent call last):") and "FormulaError" in err
    assert err.splitlines()[-1].startswith("sparsemix: error: formula 'y ~ xx' uses 'xx'")


# -- the input is never overwritten; the report is written atomically --------------------------------------

SMALL = "y ~ x + (1 | g)"
ANOVA = ["--formula", "y ~ 1 + (1 | g)", "--formula", SMALL]


def _same_file_names(tmp_path):
    """The input data.csv under every name that reaches it."""
    (tmp_path / "link.csv").symlink_to("data.csv")
    os.link(tmp_path / "data.csv", tmp_path / "hard.csv")
    return {
        "same": "data.csv",
        "dot": "./data.csv",
        "absolute": str(tmp_path / "data.csv"),
        "symlink": "link.csv",
        "hard link": "hard.csv",
        "dotdot": f"../{tmp_path.name}/data.csv",
    }


@pytest.mark.parametrize("command", ["fit", "anova"])
@pytest.mark.parametrize("name", ["same", "dot", "absolute", "symlink", "hard link", "dotdot"])
def test_output_over_the_input_is_refused_and_the_input_is_unchanged(
    capsys, frame, tmp_path, monkeypatch, command, name
):
    frame.to_csv(tmp_path / "data.csv", index=False)
    before = (tmp_path / "data.csv").read_bytes()
    output = _same_file_names(tmp_path)[name]
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    models = ANOVA if command == "anova" else ["--formula", SMALL]
    for data in ("data.csv", "link.csv"):  # the input named directly or through its symlink
        code, out, err = _run(capsys, command, data, *models, "--output", output)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and f"--output {output} is the input file {data}" in err
    assert (tmp_path / "data.csv").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing  # no report, no temporary file


def test_output_that_is_a_directory_or_in_a_missing_directory_is_refused(capsys, csv_path, tmp_path):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", SMALL, "--output", tmp_path)
    assert code == 2 and out == "" and "is a directory; give a file name" in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = _run(capsys, "anova", csv_path, *ANOVA, "--output", tmp_path / "no" / "report.txt")
    assert code == 2 and "the directory" in err and "does not exist" in err


def test_output_through_a_symlink_writes_its_target_and_keeps_the_link(capsys, csv_path, tmp_path):
    (tmp_path / "report.json").write_text("old")
    (tmp_path / "latest.json").symlink_to("report.json")
    code, _, _ = _run(
        capsys, "fit", csv_path, "--formula", SMALL, "--format", "json", "--output", tmp_path / "latest.json"
    )
    assert code == 0 and (tmp_path / "latest.json").is_symlink()
    assert json.loads((tmp_path / "report.json").read_text())["nobs"] == 399
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "report.json"]


def test_an_existing_report_keeps_its_permissions(capsys, csv_path, tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old")
    target.chmod(0o640)
    assert _run(capsys, "fit", csv_path, "--formula", SMALL, "--output", target)[0] == 0
    assert "Linear mixed model fit by REML" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("existing", [None, "the previous report\n"])
@pytest.mark.parametrize(
    "fail_in, exc",
    [
        ("fsync", OSError(errno.ENOSPC, "No space left on device")),
        ("replace", OSError(errno.EIO, "Input/output error")),
        ("fsync", KeyboardInterrupt()),
    ],
)
def test_a_failure_while_writing_leaves_no_partial_report_and_no_temporary_file(
    capsys, complete_csv, tmp_path, monkeypatch, existing, fail_in, exc
):
    target = tmp_path / "report.txt"
    if existing is not None:
        target.write_text(existing)

    def fail(*args):
        raise exc

    monkeypatch.setattr(os, fail_in, fail)
    argv = ["fit", str(complete_csv), "--formula", SMALL, "--output", str(target)]
    if isinstance(exc, OSError):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert err == f"sparsemix: error: cannot write --output {target}: {exc.strerror}\n"
    else:  # an interrupt goes on up, after the clean-up
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if existing is None else ["report.txt"])
    if existing is not None:
        assert target.read_text() == existing


def test_stdin_input_with_output_file_works(tmp_path, csv_path):
    target = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsemix",
            "fit",
            "-",
            "--formula",
            SMALL,
            "--format",
            "json",
            "--output",
            str(target),
        ],
        input=csv_path.read_bytes(),
        capture_output=True,
    )
    assert proc.returncode == 0 and proc.stdout == b""
    assert json.loads(target.read_text())["nobs"] == 399


# -- exit codes: 2 for the user's input, 3 for a bug, 1 only for a fit that did not converge ----------------


@pytest.mark.slow
def test_non_utf8_input_is_exit_2_naming_the_encoding(tmp_path, frame):
    latin = "y,x,g\n" + "".join(
        f"{y},{x},M\u00fcller{i % 6}\n" for i, (y, x) in enumerate(zip(frame.y, frame.x.fillna(0)))
    )
    raw = latin.encode("latin-1")
    proc = subprocess.run(
        [sys.executable, "-m", "sparsemix", "fit", "-", "--formula", SMALL], input=raw, capture_output=True
    )
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "sparsemix: error: standard input is not utf-8 text (it has the byte 0xfc); give "
        "its encoding with --encoding (e.g. --encoding latin-1) or save it as UTF-8\n"
    )
    path = tmp_path / "latin.csv"
    path.write_bytes(raw)
    for argv in (["fit", path, "--formula", SMALL], ["anova", path, *ANOVA]):
        proc = subprocess.run([sys.executable, "-m", "sparsemix", *map(str, argv)], capture_output=True, text=True)
        assert proc.returncode == 2 and "latin.csv is not utf-8 text (it has the byte 0xfc)" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsemix",
            "fit",
            str(path),
            "--formula",
            SMALL,
            "--encoding",
            "latin-1",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["ngroups"] == {"g": 6}


def test_parquet_without_pyarrow_is_exit_2_naming_the_extra(capsys, frame, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")  # to write the file
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import raises ImportError
    for argv in (["fit", path, "--formula", SMALL], ["anova", path, *ANOVA]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert err == (
            "sparsemix: error: reading Parquet files needs pyarrow, which is not installed; install it "
            "with pip install 'sparsemix[parquet]'\n"
        )


@pytest.mark.parametrize("sep, option", [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_a_file_separated_otherwise_than_by_commas_gets_a_sep_hint_and_fits_with_sep(
    capsys, frame, tmp_path, sep, option
):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False, sep=sep)
    code, out, err = _run(capsys, "fit", path, "--formula", SMALL)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.rstrip().endswith(
        f"has a single column, {sep.join(frame.columns)!r}; the header looks separated by "
        f"{cli.SEPARATOR_NAMES[sep]}: give --sep {option}"
    )
    code, out, _ = _run(capsys, "fit", path, "--formula", SMALL, "--sep", option.strip("'"), "--format", "json")
    assert code == 0
    assert json.loads(out)["llf"] == pytest.approx(sparsemix.lmer(SMALL, frame).llf, rel=1e-12)


def test_decimal_commas_with_semicolons_get_the_hint_and_tsv_files_read_as_tabs(capsys, frame, tmp_path):
    path = tmp_path / "european.csv"
    path.write_text("y;x;g\n1,5;2,0;1\n2,5;1,0;2\n")
    code, _, err = _run(capsys, "fit", path, "--formula", SMALL)
    assert code == 2 and err.count("\n") == 1 and err.rstrip().endswith("give --sep ';'")
    tsv = tmp_path / "data.tsv"
    frame.to_csv(tsv, index=False, sep="\t")
    code, out, _ = _run(capsys, "fit", tsv, "--formula", SMALL, "--format", "json")
    assert code == 0 and json.loads(out)["nobs"] == 399


@pytest.mark.parametrize(
    "option, value",
    [
        ("--maxiter", "0"),
        ("--maxiter", "-1"),
        ("--maxiter", "ten"),
        ("--maxiter", "2.5"),
        ("--sep", ";;"),
        ("--sep", ""),
        ("--encoding", "klingon"),
    ],
)
def test_bad_option_values_are_usage_errors(capsys, csv_path, option, value):
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(csv_path), "--formula", SMALL, f"{option}={value}"])
    assert exc.value.code == 2
    assert (
        f"argument {option}: {'unknown encoding' if option == '--encoding' else 'must be'}" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ " + " + ".join(["x"] * 490) + " + (1 | g)",
        "y ~ x + (1 | g) + " + " + ".join(f"I(x ** {i})" for i in range(600)),
    ],
)
def test_a_formula_too_long_to_parse_is_exit_2(capsys, complete_csv, formula):
    code, out, err = _run(capsys, "fit", complete_csv, "--formula", formula)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("sparsemix: error: ") and "too long or too deeply nested" in err


@pytest.mark.parametrize(
    "formula, message",
    [
        ('y ~ f"{x}" + (1 | g)', "an f-string"),
        ("y ~ x + (1 | f'{g}')", "is not a variable name"),
        ("y ~ x + (1 | g) + I(10**10**10)", "cannot be computed"),
        ("y ~ x + " + " + ".join(["(1 | g)"] * 500), "(1 | g)"),
    ],
)
def test_hostile_formulas_are_exit_2_with_one_line(capsys, complete_csv, formula, message):
    code, out, err = _run(capsys, "fit", complete_csv, "--formula", formula)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("sparsemix: error: ") and message in err


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (
            IndexError("index 7 is out of bounds"),
            3,
            "internal error: IndexError: index 7 is out of bounds (please report it; --debug shows the traceback)",
        ),
        (np.linalg.LinAlgError("Singular matrix"), 3, "internal error: LinAlgError: Singular matrix"),
        (MemoryError(), 2, "out of memory building or fitting the model"),
        (
            RecursionError("maximum recursion depth exceeded"),
            2,
            "the formula is too long or too deeply nested to parse",
        ),
        (sparsemix.InputError("bad input, fix it"), 2, "bad input, fix it"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "anova"])
def test_unexpected_errors_exit_3_with_one_line_and_the_traceback_under_debug(
    capsys, complete_csv, monkeypatch, exc, code, message, command
):
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(sys.modules["sparsemix.lme4.lmer"], "lmer", broken)
    models = ANOVA if command == "anova" else ["--formula", SMALL]
    got, out, err = _run(capsys, command, complete_csv, *models)
    assert got == code and out == "" and err.count("\n") == 1 and err.startswith(f"sparsemix: error: {message}")
    got, out, err = _run(capsys, command, complete_csv, *models, "--debug")
    assert got == code and out == ""
    assert err.startswith("Traceback (most recent call last):") and "in broken" in err
    assert err.splitlines()[-1].startswith("sparsemix: error: ") and "--debug shows" not in err


def test_an_internal_error_is_exit_3_from_the_installed_command(complete_csv):
    script = (
        "import sys, sparsemix.lme4.lmer\n"
        "m = sys.modules['sparsemix.lme4.lmer']\n"
        "def broken(*a, **k): raise KeyError('theta')\n"
        "m.lmer = broken\n"
        "from sparsemix.cli import main\n"
        f"sys.exit(main(['fit', {str(complete_csv)!r}, '--formula', 'y ~ x + (1 | g)']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        "sparsemix: error: internal error: KeyError: 'theta' (please report it; --debug shows the traceback)\n"
    )


def test_a_closed_standard_output_exits_141_without_a_message(complete_csv):
    """`sparsemix fit ... | true`: before, the BrokenPipeError exited 2 as if the input were bad."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsemix", "fit", str(complete_csv), "--formula", FORMULA],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader leaves before the report is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE == 141
    assert err == ""


# -- glmer on the command line (issue 17) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cbpp_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cbpp.csv"
    pd.DataFrame(json.loads((Path(__file__).parent / "reference" / "glmer.json").read_text())["cbpp"]["data"]).to_csv(
        path, index=False
    )
    return path


def test_family_fits_glmer_and_json_says_which(capsys, cbpp_csv):
    formula = "cbind(incidence, size - incidence) ~ C(period) + (1 | herd)"
    code, out, _ = _run(capsys, "fit", cbpp_csv, "--formula", formula, "--family", "binomial", "--format", "json")
    assert code == 0
    record = json.loads(out)
    assert (record["family"], record["link"], record["nAGQ"], record["method"]) == ("binomial", "logit", 1, "ML")
    direct = sparsemix.glmer(formula, pd.read_csv(cbpp_csv), family="binomial")
    assert record["llf"] == pytest.approx(direct.llf, rel=1e-10)
    np.testing.assert_allclose([r["z"] for r in record["fixed_effects"]], direct.fixed_effects()["z"], rtol=1e-8)
    code, out, _ = _run(capsys, "fit", cbpp_csv, "--formula", formula, "--family", "binomial", "--link", "probit")
    assert code == 0 and "( probit )" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--link", "probit"], "--link and --nAGQ are for --family binomial or poisson"),
        (["--family", "poisson", "--link", "logit"], "the poisson family takes the link 'log'"),
        (["--family", "binomial", "--nAGQ", "5"], "single scalar random-effect term"),
    ],
)
def test_glmer_options_that_do_not_fit_exit_2(capsys, cbpp_csv, extra, message):
    formula = "prop ~ C(period) + (1 | herd) + (1 | period)"
    code, _, err = _run(capsys, "fit", cbpp_csv, "--formula", formula, *extra)
    assert code == 2 and message in err
