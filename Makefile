# gptlab: `make repro` runs the pipeline, `make test` runs the tests. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install first; e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gptlab-installed
# Stage commands run `python`: make it the virtual environment's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test lint bench plots check-fresh clean-venv

setup: $(STAMP)

# Reinstalls only when the project's dependencies (or the torch choice) change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	echo "$(TORCH_SPEC)" > $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src stages tests

bench: repro
	$(BIN)/python -m gptlab.bench

# Loss curves of the workspace and of experiments, e.g. `make plots REVS="exp-a exp-b"`, as an
# HTML page in dvc_plots/ that renders offline (the plotting libraries inlined from npm).
PLOTS_TEMPLATE := .gptlab/plots-template.html
REVS ?=
plots: setup $(PLOTS_TEMPLATE)
	$(BIN)/dvc plots diff --html-template $(PLOTS_TEMPLATE) $(REVS)

$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/gptlab plots-template $@

# Clone the committed HEAD into a temporary folder and run the README's two commands there.
check-fresh: setup
	GPTLAB_SLOW=1 $(BIN)/python -m pytest -q tests/test_fresh.py

clean-venv:
	rm -rf $(VENV)
