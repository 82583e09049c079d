"""The experiment workflow a user relies on, through DVC in a temporary git repo: queued runs use
their own code and the project's caches, stages run with the project's environment from any
shell, the log grows while training runs, and the model is a registered artifact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import (
    DVC_YAML,
    ROOT,
    copy_project,
    dvc,
    dvc_run,
    git,
    start_train,
    train_project,
    with_overrides,
    write_params,
)

VENV = Path(sys.executable).parents[1]
README = (ROOT / "README.md").read_text()
EDIT_MARK = '    return {**metrics, "tokens_per_sec"'


def with_venv(project: Path) -> Path:
    """The project's own .venv, as `make setup` makes it (here: this test run's environment)."""
    (project / ".venv").symlink_to(VENV)
    return project


def experiment_metrics(project: Path, name: str, file: str) -> dict:
    """A named experiment's metrics file, as `dvc exp show --json` reports it."""
    for baseline in json.loads(dvc(project, "exp", "show", "--json")):
        for run in baseline.get("experiments") or []:
            for revision in run["revs"]:
                if revision.get("name") == name:
                    return revision["data"]["metrics"][file]["data"]
    raise AssertionError(f"no experiment {name!r} in `dvc exp show`")


def test_a_queued_experiment_runs_the_code_it_was_queued_with(pipeline, tmp_path):
    project = with_venv(copy_project(pipeline[0], tmp_path))
    evaluate = project / "src" / "gptlab" / "evaluate.py"
    original = evaluate.read_text()
    assert EDIT_MARK in original
    evaluate.write_text(original.replace(EDIT_MARK, '    return {**metrics, "queued_code": 1, '
                                                    '"tokens_per_sec"'))
    dvc(project, "exp", "run", "--queue", "-S", "train.max_iters=30", "-n", "edited")
    evaluate.write_text(original)  # the workspace back as it was before the queue runs
    dvc(project, "exp", "run", "--run-all")  # in a copy of the project under .dvc/tmp/exps
    assert experiment_metrics(project, "edited", "metrics/eval.json")["queued_code"] == 1
    assert "queued_code" not in json.loads((project / "metrics" / "eval.json").read_text())
    # Its train stage checkpointed into the project's own cache, not the deleted copy's: a
    # killed queued experiment resumes when it is run again.
    runs = {p.name for p in (project / ".gptlab" / "runs").iterdir()}
    originals = {p.name for p in (pipeline[0] / ".gptlab" / "runs").iterdir()}
    assert len(runs - originals) == 1


def test_stages_run_with_the_projects_environment_from_a_shell_without_it(pipeline, tmp_path):
    """`.venv/bin/dvc repro`, or a dvc installed with pipx: no virtual environment active."""
    project = copy_project(pipeline[0], tmp_path / "with")
    with_venv(project)
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "dvc", "repro", "-f", "-s", "plot"]
    ran = subprocess.run(command, cwd=project, env=bare, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # No .venv, and no python on PATH with the dependencies: the first line says what to do.
    without = copy_project(pipeline[0], tmp_path / "without")
    failed = subprocess.run(command, cwd=without, env=bare, capture_output=True, text=True)
    assert failed.returncode != 0
    first = next(line for line in failed.stderr.splitlines() if line.strip())
    assert first.startswith("error: ") and "no .venv" in first
    assert "run `make setup`, then `source .venv/bin/activate`" in first


def test_the_log_grows_while_training_runs_and_resumes_to_the_same_rows(
        tmp_path, char_tokens, default_params, uninterrupted_train):
    project = train_project(tmp_path, char_tokens, default_params)
    # Rows every 5 steps, a checkpoint every 50: rows appear long before the first checkpoint.
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, with_overrides(params, {"train.log_interval": 5,
                                                  "train.checkpoint_interval": 50}))
    log = project / "plots" / "train_log.csv"
    process = start_train(project)
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):  # header, 0, 5, 10
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    assert not list(project.glob(".gptlab/runs/*/step-*"))  # no checkpoint yet
    process.kill()
    process.communicate()
    resumed = start_train(project)
    assert resumed.wait() == 0
    rows = log.read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [str(step) for step in range(0, 201, 5)]


def test_the_trained_model_is_a_registered_artifact(pipeline, tmp_path):
    assert DVC_YAML["artifacts"]["gpt"] == {
        "path": "models", "type": "model", "desc": DVC_YAML["artifacts"]["gpt"]["desc"],
        "labels": ["gpt", "gptlab"]}
    project = copy_project(pipeline[0], tmp_path)
    # A registered version: an annotated tag named as DVC's model registry (GTO) names them.
    git(project, "tag", "-a", "gpt@v1.0.0", "-m", "Registering artifact gpt version v1.0.0")
    out = tmp_path / "fetched"
    result = dvc_run(project, "artifacts", "get", str(project), "gpt", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert ((out / "model.safetensors").read_bytes()
            == (project / "models" / "model.safetensors").read_bytes())


def test_going_back_as_the_readme_says_restores_the_committed_state(pipeline, tmp_path):
    project = with_venv(copy_project(pipeline[0], tmp_path))
    committed = {name: (project / name).read_bytes()
                 for name in ("params.yaml", "dvc.lock", "metrics/eval.json")}
    dvc(project, "exp", "run", "-S", "sample.temperature=0.5", "-n", "cooler")
    assert (project / "params.yaml").read_bytes() != committed["params.yaml"]
    recipe = re.search(r"Back to the committed state.*?```\n(.+?)\n```", README, re.DOTALL)[1]
    subprocess.run(recipe, shell=True, cwd=project, check=True, capture_output=True,
                   env={"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert {name: (project / name).read_bytes() for name in committed} == committed
    assert "up to date" in dvc(project, "status")
