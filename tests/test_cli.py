"""The `sparsemix` command: CSV, Parquet and standard input; text, JSON and markdown; exit codes and messages."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix.cli import main

JSON_KEYS = {"formula", "method", "nobs", "n_dropped", "ngroups", "llf", "aic", "bic", "converged", "singular",
             "fixed_effects", "variance_components", "fit_seconds", "sparsemix_version"}
FORMULA = "y ~ x + (1 + x | g) + (1 | h)"


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(21)
    n = 400
    g, h, x = rng.integers(0, 12, n), rng.integers(0, 7, n), rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=12)[g] + 0.4 * x * rng.normal(size=12)[g] + rng.normal(size=7)[h] \
        + rng.normal(size=n)
    d = pd.DataFrame({"y": y, "x": x, "g": g, "h": h})
    d.loc[5, "x"] = np.nan
    return d


@pytest.fixture(scope="module")
def csv_path(frame, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "data.csv"
    frame.to_csv(path, index=False)
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
    assert [(r["grp"], r["var1"], r["var2"]) for r in record["variance_components"]] == \
        list(zip(vc.grp, vc.var1, vc.var2))
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
    parquet = tmp_path / "data.parquet"
    frame.to_parquet(parquet)
    _, out_csv, _ = _run(capsys, "fit", csv_path, "--formula", FORMULA, "--format", "json")
    _, out_pq, _ = _run(capsys, "fit", parquet, "--formula", FORMULA, "--format", "json")
    proc = subprocess.run([sys.executable, "-m", "sparsemix", "fit", "-", "--formula", FORMULA, "--format", "json"],
                          input=csv_path.read_text(), capture_output=True, text=True, check=True)
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
    assert "evaluation" not in err                          # capsys' stderr is not a terminal
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


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('y,x,g\n1,2,3\n"4,5,6\n', "not a well-formed CSV file"),
    ("y,x,g\n", "has a header but no rows"),
])
def test_bad_files_exit_2_with_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code, out, err = _run(capsys, "fit", path, "--formula", "y ~ x + (1 | g)")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sparsemix: error:") and message in err


@pytest.mark.parametrize("formula, message", [
    ("y ~ xx + (1 | g)", "Did you mean 'x'?"),
    ("y ~ x + (1 | gg)", "Did you mean 'g'?"),
    ('y ~ __import__("os").system("echo hacked") + (1 | g)', "attribute"),
    ("y ~ x", "no random-effects term"),
])
def test_input_errors_exit_2_with_one_line(capsys, csv_path, formula, message):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", formula)
    assert code == 2 and out == "" and "hacked" not in out + err.split(":", 2)[0]
    assert err.count("\n") == 1 and message in err


def test_missing_file_and_usage_errors(capsys, tmp_path):
    code, _, err = _run(capsys, "fit", tmp_path / "nope.csv", "--formula", "y ~ 1 + (1 | g)")
    assert code == 2 and "no such file" in err
    with pytest.raises(SystemExit) as exc:
        main(["fit", "data.csv"])                # --formula missing: argparse's usage error
    assert exc.value.code == 2
    code, _, err = _run(capsys, "anova", tmp_path / "nope.csv", "--formula", "y ~ 1 + (1 | g)")
    assert code == 2


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, csv_path):
    code, out, err = _run(capsys, "fit", csv_path, "--formula", "y ~ xx + (1 | g)", "--debug")
    assert code == 2 and out == ""
    assert err.startswith("Traceback (most recent call last):") and "FormulaError" in err
    assert err.splitlines()[-1].startswith("sparsemix: error: formula 'y ~ xx' uses 'xx'")
