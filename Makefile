# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   -> installs what is missing, then fits the statsmodels notebook's four models
#   make test   -> installs what is missing, then runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CHOLMOD headers and library; OpenBLAS because Debian's default reference BLAS makes CHOLMOD's
# supernodal factorization about 3.4x slower.
DEBIAN_PACKAGES := libsuitesparse-dev libopenblas0-pthread

.PHONY: demo test test-fast lint docs bench compare system-deps clean

demo: $(STAMP)
	$(BIN)/python examples/variance_components.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: the suite without the tests marked slow (each over ~3 s); CI runs the whole suite.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (lint, and the format check) on everything; mypy on core/ and fit/ (pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lint]"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	cd asv_bench && ../$(BIN)/asv machine --yes >/dev/null && \
		../$(BIN)/asv run --quick --python=same --show-stderr --set-commit-hash=$$(git rev-parse HEAD)

# Side by side with statsmodels (and lme4 through Rscript, when R and lme4 are installed): docs/performance.md
compare: $(STAMP)
	$(BIN)/python asv_bench/compare/compare.py --suite all --reps 7 --output docs/performance.md

# API reference from the docstrings plus the pages of docs/, into site/; --strict fails on a broken link or reference.
docs: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	$(BIN)/mkdocs build --strict --site-dir site

system-deps:
	@missing=""; \
	for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing build-essential"; \
	$(PYTHON) -c "import ensurepip" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	$(PYTHON) -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m sparsemix compile  # numba's kernels into its cache now, not during the first fits
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache asv_bench/.asv site
