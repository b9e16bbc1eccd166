"""What several test modules share: the lme4 reference fixtures (tests/reference/*.json, written by the committed R
scripts there) and the data they embed."""

import json
import os
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest

REFERENCE = Path(__file__).parent / "reference"

# The compiled kernels built in the test process when first needed (core/compiled.py), as numba alone would: which
# path a fit takes must not depend on how far a background compile has got (test_compiled.py sets its own modes).
os.environ["SPARSEMIX_JIT"] = "now"


@lru_cache(maxsize=None)
def _reference_text(name: str) -> str:
    return (REFERENCE / f"{name}.json").read_text()


def load_reference(name: str) -> dict:
    """The reference document `name` (tests/reference/<name>.json): its fits, and its data when embedded."""
    return json.loads(_reference_text(name))


def reference_data(name: str) -> pd.DataFrame:
    """The data a reference document embeds (lme4's data sets; the seed designs are not embedded)."""
    return pd.DataFrame(load_reference(name)["data"])


def reference_fit(name: str, fit_name: str) -> tuple[dict, dict]:
    """(document, the fit called `fit_name` in it)."""
    doc = load_reference(name)
    return doc, next(f for f in doc["fits"] if f["name"] == fit_name)


@pytest.fixture(scope="session")
def sleepstudy() -> pd.DataFrame:
    """lme4's sleepstudy with the fixture's extra columns (w, off)."""
    return reference_data("sleepstudy")
