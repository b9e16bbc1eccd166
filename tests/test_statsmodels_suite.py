"""statsmodels' own MixedLM tests, run against sparsemix.

statsmodels ships its MixedLM tests in its wheel (statsmodels/regression/tests/test_lme.py). This test copies
that file (and the results/ directory it reads its R fixtures and data sets from) into a temporary package,
swaps the imports listed in SWAPS so that every MixedLM, MixedLMParams, summary and warning the tests touch is
sparsemix's, runs the copy with pytest in a subprocess, and requires every test to pass except those in
LEFT_OUT, each with its reason (they run, but their outcome is not counted). Cost: one pytest run of 123
tests, ~13 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

statsmodels = pytest.importorskip("statsmodels")

SUITE_DIR = Path(statsmodels.__file__).parent / "regression" / "tests"
PACKAGE = "statsmodels_lme_suite"

# (pattern, replacement, why). Each pattern must match the installed file, so a statsmodels release that
# rewrites these imports makes this test fail with a message saying which swap no longer applies.
SWAPS = [
    (
        r"from statsmodels\.regression\.mixed_linear_model import \(\s*MixedLM,\s*MixedLMParams,\s*"
        r"_smw_logdet,\s*_smw_solver,?\s*\)",
        "from sparsemix import MixedLM, MixedLMParams\n"
        "from statsmodels.regression.mixed_linear_model import _smw_logdet, _smw_solver",
        "the classes under test; the private helpers stay statsmodels' (their tests are left out below)",
    ),
    (
        r"from statsmodels\.iolib\.summary2 import Summary\n",
        "from sparsemix.statsmodels.summary import MixedLMSummary as Summary\n",
        "test_summary_after_remove_data checks that summary() returns the library's summary class",
    ),
    (
        r"from statsmodels\.tools\.sm_exceptions import SingularMatrixWarning\n",
        "from sparsemix import SingularFitWarning as SingularMatrixWarning\n",
        "sparsemix's warning for a singular random-effects covariance (it cannot raise statsmodels' class "
        "without importing statsmodels)",
    ),
    (
        r"from statsmodels\.formula\.api import mixedlm\n",
        "mixedlm = MixedLM.from_formula\n",
        "test_formulas compares the array and formula constructors of the same library",
    ),
]

# Tests not run against sparsemix: statsmodels-node-id prefix -> why.
LEFT_OUT = {
    # statsmodels' private Sherman-Morrison-Woodbury helpers, imported from statsmodels itself: they test
    # statsmodels' dense per-group algebra, which sparsemix replaces by a sparse Cholesky factorization.
    "TestSMWSolver::test_smw_solver": "private helper _smw_solver (statsmodels' own code)",
    "TestSMWLogdet::test_smw_logdet": "private helper _smw_logdet (statsmodels' own code)",
    # statsmodels' optimizer artefact: on these data (100 rows, 3 groups) statsmodels' fit fails (its llf is
    # inf, the intercept's standard error 6.2e6) and stops at cov_re = 0, hence its SingularMatrixWarning.
    # The REML optimum is interior: lme4 gives Group Var 0.00056914, logLik -150.7394, isSingular() FALSE,
    # and so does sparsemix, which therefore has no singular fit to warn about. A truly singular fit does
    # warn (test_statsmodels_dropin.py::test_singular_covariance_warns).
    "test_singular": "statsmodels' optimizer stops at cov_re = 0 where the optimum is interior (lme4 agrees)",
    # statsmodels' own standard errors, asserted to 4 decimals: it inverts its observed Hessian (fixed
    # effects x variance cross terms included), where sparsemix reports lme4's vcov, sigma^2 (R_X'R_X)^-1
    # (docs/statsmodels.md). On this 15-row, 3-group example lme4 gives Intercept 1.4854, X 0.1647 and
    # Intercept 1.4398, Y 0.1318, as sparsemix prints; statsmodels 1.6546, 0.1959, 1.8882, 0.2080 (and the
    # p-value star that follows). The coefficients, Group Var and its standard error, and the layout match:
    # test_statsmodels_dropin.py::test_summary_col_with_lme4_standard_errors checks the whole table.
    "test_summary_col": "asserts statsmodels' Hessian-based fixed-effect SEs; sparsemix reports lme4's",
}


def _patched_source(source: str) -> str:
    for pattern, replacement, why in SWAPS:
        source, n = re.subn(pattern, lambda _m, r=replacement: r, source)
        assert n == 1, (
            f"statsmodels {statsmodels.__version__}'s test_lme.py no longer matches the swap for "
            f"{why!r} (pattern {pattern!r}); update SWAPS in {__file__}"
        )
    return source


def _node_id(case: ET.Element) -> str:
    classname = case.get("classname", "")
    prefix = f"{PACKAGE}.test_lme"
    cls = classname[len(prefix) + 1 :] if classname.startswith(prefix + ".") else ""
    return f"{cls}::{case.get('name')}" if cls else case.get("name")


def _outcomes(report: Path) -> dict[str, str]:
    """node id -> "" for a pass, else the failure's message (first line of the error and its type)."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if case.find("skipped") is not None:
            out[_node_id(case)] = "skipped: " + (case.find("skipped").get("message") or "")
        elif problem is not None:
            text = problem.text or ""
            where = [line for line in text.splitlines() if re.match(r"\S+\.py:\d+", line)]
            message = (problem.get("message") or "").strip()[:1500]
            out[_node_id(case)] = message + (f"\n  at {where[-1]}" if where else "")
        else:
            out[_node_id(case)] = ""
    return out


def _left_out(node_id: str) -> bool:
    return any(node_id == p or node_id.startswith(p + "[") for p in LEFT_OUT)


@pytest.fixture(scope="module")
def suite_outcomes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("statsmodels_suite")
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copytree(SUITE_DIR / "results", package / "results")
    source = (SUITE_DIR / "test_lme.py").read_text(encoding="utf-8")
    (package / "test_lme.py").write_text(_patched_source(source), encoding="utf-8")
    (root / "pytest.ini").write_text("[pytest]\n")  # keep this repository's pytest settings out
    report = root / "report.xml"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(root / "pytest.ini"),
            "--rootdir",
            str(root),
            f"--junitxml={report}",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            str(package / "test_lme.py"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), f"pytest did not run statsmodels' suite:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return _outcomes(report)


@pytest.mark.slow
def test_every_public_api_test_of_statsmodels_passes(suite_outcomes):
    public = {k: v for k, v in suite_outcomes.items() if not _left_out(k)}
    assert len(public) >= 80, f"only {len(public)} public-API tests were collected: {sorted(public)}"
    failed = {k: v for k, v in public.items() if v}
    report = "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    assert not failed, (
        f"{len(failed)} of {len(public)} of statsmodels' public-API tests fail with sparsemix:\n\n{report}"
    )


def test_left_out_list_names_existing_tests(suite_outcomes):
    for prefix in LEFT_OUT:
        assert any(k == prefix or k.startswith(prefix + "[") for k in suite_outcomes), (
            f"LEFT_OUT names {prefix!r}, which statsmodels' suite no longer has"
        )
