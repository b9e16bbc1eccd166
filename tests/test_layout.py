"""The package's shape: the version written once (pyproject.toml), read by the package."""
import tomllib
from pathlib import Path

import sparsemix

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_pyprojects():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sparsemix.__version__ == declared
