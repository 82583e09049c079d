"""The fixtures several test modules share: the project's params, a token folder, one
uninterrupted train stage run, and one pipeline run that the pipeline, remote and plot tests all
read (each test that changes a project works on its own copy). Plain helpers are in helpers.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    PLAYS,
    ROOT,
    TINY_MODEL,
    TINY_SAMPLE,
    TINY_TRAIN,
    TINYSHAKESPEARE,
    commit,
    dvc,
    git,
    make_corpus,
    make_project,
    start_train,
    train_project,
    with_overrides,
    write_params,
    write_tokens,
)

# The fixtures below that run the whole pipeline or a whole training: a test that uses one is
# slow, so `make test-fast` leaves it out (pytest marks tests, not fixtures).
SLOW_FIXTURES = {"pipeline", "uninterrupted_train"}


# The files that take longest, longest first. `make test` runs them first (pytest-xdist keeps
# this order with --no-loadscope-reorder), so that neither process is left with a long file at
# the end while the other idles.
LONGEST_FILES = ["test_lab.py", "test_faults.py", "test_experiments.py", "test_presets.py",
                 "test_scaling.py", "test_pipeline.py", "test_downstream.py", "test_serve.py",
                 "test_distributed.py", "test_train.py"]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files


@pytest.fixture(scope="session")
def default_params() -> dict[str, Any]:
    """The project's params.yaml as a plain dict (copy it before changing it)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def params_for(default_params: dict[str, Any]):
    """Build a params dict from the project's defaults with dotted-key overrides."""
    return lambda overrides=None: with_overrides(default_params, overrides or {})


@pytest.fixture
def tinyshakespeare() -> Path:
    return TINYSHAKESPEARE


@pytest.fixture(scope="session")
def char_tokens(tmp_path_factory) -> Path:
    """A data/tokens folder of make_corpus(), char-level, to copy or read."""
    return write_tokens(tmp_path_factory.mktemp("char-tokens"), make_corpus())


@pytest.fixture(scope="session")
def uninterrupted_train(tmp_path_factory, char_tokens, default_params) -> tuple[Path, float]:
    """The train stage run once from start to end, and how long it took: what every
    interrupted run must reproduce."""
    reference = train_project(tmp_path_factory.mktemp("reference"), char_tokens, default_params)
    started = time.monotonic()
    process = start_train(reference)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    return reference, time.monotonic() - started


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, default_params) -> tuple[Path, str]:
    """A project repo on a small local corpus (four plays, one twice) whose whole pipeline has
    run once and been committed, and the output of that run. Read it, or copy it to change it.
    """
    project = make_project(tmp_path_factory.mktemp("pipeline"))
    corpus = project / "corpus"
    corpus.mkdir()
    for index, (name, line) in enumerate(PLAYS.items()):
        (corpus / name).write_text(f"{name.upper()}\n\n" + line * (40 + 10 * index))
    shutil.copy(corpus / "hamlet.txt", corpus / "hamlet_again.txt")  # work for the deduper
    write_params(project, with_overrides(default_params, {
        "data.source": "local", "data.spec": "corpus", "data.sha256": None,
        "data.include": ["*.txt"],
        "clean.min_chars": 100,
        **{f"model.{key}": value for key, value in TINY_MODEL.items()},
        **{f"train.{key}": value for key, value in TINY_TRAIN.items()},
        **{f"sample.{key}": value for key, value in TINY_SAMPLE.items()},
    }))
    git(project, "init", "-q")
    for key, value in (("user.name", "gptlab tests"), ("user.email", "tests@gptlab")):
        git(project, "config", key, value)  # DVC commits queued experiments as this user
    commit(project, "init")  # the corpus goes into git: a clone's download stage reads it
    first_run = dvc(project, "repro")
    commit(project, "pipeline ran")  # dvc.lock, metrics, plots, samples
    return project, first_run

