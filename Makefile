# gptlab: `make repro` runs the pipeline, `make test` runs the tests. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install first; e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Everything else comes from the lock file, installed with uv; `make lock` updates the lock.
UV_SPEC ?= uv==0.13.9
LOCK := requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.gptlab-installed
PLOTS_TEMPLATE := .gptlab/plots-template.html
# DVC's queue worker starts `dvc` by name: with this file in site-packages every Python of the
# environment puts the environment's bin/ first on PATH, so `.venv/bin/dvc queue start` works
# from a shell where the environment is not activated.
VENV_PATH_PTH := src/gptlab/venv-path.pth
# Processes that share the test suite, a test file each at a time (its fixtures made once).
TEST_WORKERS ?= 2
# dvc, and the workers `dvc queue start` spawns, come from the virtual environment.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro reset test test-fast lint deps bench docs exps plots plots-template lock check-fresh clean-venv params-docs

setup: $(STAMP)

# Reinstalls only when the lock or the project's metadata change.
$(STAMP): pyproject.toml $(LOCK) $(VENV_PATH_PTH)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip '$(UV_SPEC)'
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	cp $(VENV_PATH_PTH) "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	@$(MAKE) --no-print-directory plots-template
	echo "$(TORCH_SPEC)" > $@

# The page template of `dvc plots` pages: their layout (charts as wide as the page, figures
# scaled to fit), and the plotting libraries fetched from npm once and inlined, so that the
# pages render without the internet. Without npm the pages load them from a CDN. Made again
# when src/gptlab/plots.py changes.
plots-template:
	@if ! command -v npm > /dev/null; then \
	    echo "note: npm not found: dvc plots pages will load their libraries from a CDN"; \
	    $(BIN)/gptlab plots-template --cdn $(PLOTS_TEMPLATE) > /dev/null; \
	elif ! test $(PLOTS_TEMPLATE) -nt src/gptlab/plots.py; then \
	    $(BIN)/gptlab plots-template $(PLOTS_TEMPLATE) || test -f $(PLOTS_TEMPLATE) || \
	        $(BIN)/gptlab plots-template --cdn $(PLOTS_TEMPLATE); \
	fi
	@$(BIN)/dvc config --local plots.html_template ../$(PLOTS_TEMPLATE)

# The lock: the newest versions pyproject.toml allows, for every platform and Python >= 3.10,
# with their hashes; torch is left to TORCH_SPEC.
lock: setup
	printf "torch ; sys_platform == 'never'\n" > $(VENV)/lock-overrides.txt
	$(BIN)/uv pip compile --quiet --universal --python-version 3.10 --generate-hashes \
	    --override $(VENV)/lock-overrides.txt --extra dev pyproject.toml -o $(LOCK)

# DVC ends a run with "Use `dvc push` to send your updates to remote storage", which needs a
# remote first: without one, say how to add it.
repro: setup
	$(BIN)/dvc repro
	@$(BIN)/dvc remote list | grep -q . || echo "To share outputs with \`dvc push\`, add a remote first: \`dvc remote add -d storage PATH-OR-URL\` (docs/scaling-out.md)"

# Back to the committed state, discarding every uncommitted change to tracked files: DVC's
# outputs come back from its cache, and what the cache lacks (a fresh clone's is empty, and
# another machine's weights differ in their last bits) is made again by the pipeline.
reset:
	git checkout HEAD -- .
	$(BIN)/dvc checkout || $(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit loop: the tests marked slow (pipelines, DVC experiments, training subprocesses, a
# browser) left out.
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: setup
	$(BIN)/ruff check src stages tests

# dvc.yaml's code deps, written from what each stage's script imports (only those lists change).
deps: setup
	$(BIN)/gptlab stages --write

# The documentation site (docs/, mkdocs.yml) into site/; any broken link or page left out of the
# nav fails the build.
docs: setup
	$(BIN)/mkdocs build --strict

# The parameter reference (docs/parameters.md) and params.yaml's comments, written from the
# descriptions in src/gptlab/params.py; also brings back the comments `dvc exp run -S` drops.
params-docs: setup
	$(BIN)/gptlab params --docs docs/parameters.md
	$(BIN)/gptlab params --comments params.yaml

bench: repro
	$(BIN)/python -m gptlab.bench tests/data/tinyshakespeare.txt

# The experiments: the params they changed and the metrics that compare them, legible at 100
# columns (speeds, utilisation, memory, trainable parameters, the evaluated token counts, and
# the hashes of every dependency and output left out).
exps: setup
	$(BIN)/dvc exp show --only-changed \
	    --drop '.*(_sec|_seconds|_mb|mfu|perplexity|final_|best_|trainable_|Created|State|Executor).*' \
	    --drop '.*/|requirements\.lock$$|models$$|plots$$' --drop '(tokens|bytes)$$'

# Loss curves of the workspace and of experiments, e.g. `make plots REVS="exp-a exp-b"`, as an
# HTML page in dvc_plots/ (offline where `make setup` could build the page template).
REVS ?=
plots: setup plots-template
	$(BIN)/dvc plots diff $(REVS)

# Clone the committed HEAD into a temporary folder and run the README's two commands there.
check-fresh: setup
	$(BIN)/python -m pytest -q -m fresh tests/test_fresh.py

clean-venv:
	rm -rf $(VENV)
