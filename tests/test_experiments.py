"""The experiment workflow a user relies on, through DVC in a temporary git repo: queued runs use
their own code and the project's caches, stages run with the project's environment from any
shell, the log grows while training runs, and the model is a registered artifact; and
gptlab.lab.experiments, which reads the experiments back for `gptlab compare`, `scaling` and
`report`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    DVC_YAML,
    PASSIVE_THREADS,
    ROOT,
    STAGE_TRAIN,
    VENV,
    copy_project,
    dvc,
    dvc_run,
    git,
    gptlab,
    run_stage,
    start_train,
    train_project,
    with_overrides,
    with_venv,
    write_params,
)

from gptlab.errors import GptlabError
from gptlab.lab.experiments import (
    flat_metrics,
    flatten,
    git_output,
    parse_experiments,
    read_experiments,
    stale_runs,
    unflatten,
)

README = (ROOT / "README.md").read_text()
EDIT_MARK = '    metrics["tokens_per_sec"] = '


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
    evaluate.write_text(original.replace(EDIT_MARK, '    metrics["queued_code"] = 1\n' + EDIT_MARK))
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
    # (The stage's command as DVC runs it: this environment's Python would put its own bin/
    # first on PATH, as a dvc installed elsewhere, with pipx say, does not.)
    without = copy_project(pipeline[0], tmp_path / "without")
    stage = DVC_YAML["stages"]["plot"]["cmd"].split()
    failed = subprocess.run(stage, cwd=without, env=bare, capture_output=True, text=True)
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
    steps = range(0, STAGE_TRAIN["max_iters"] + 1, 5)
    assert [row.split(",")[0] for row in rows[1:]] == [str(step) for step in steps]


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
                   env={"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
                        **PASSIVE_THREADS})
    assert {name: (project / name).read_bytes() for name in committed} == committed
    assert "up to date" in dvc(project, "status")


def test_the_environments_python_finds_its_own_dvc_from_a_shell_without_it(tmp_path):
    """DVC's queue worker starts `dvc` by name: `.venv/bin/dvc queue start` from a shell where
    the environment is not activated must find the environment's dvc (make setup's .pth)."""
    found = subprocess.run(
        [sys.executable, "-c", "import os, shutil; print(shutil.which('dvc'), os.environ['PATH'])"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
        check=True).stdout.split()
    assert found == [str(VENV / "bin" / "dvc"), f"{VENV / 'bin'}:/usr/bin:/bin"]


# --- reading experiments (gptlab.lab.experiments) -----------------------------------------------

def shown_revision(name: str, params: dict, metrics: dict[str, dict], state: str = "success",
                   error: dict | None = None) -> dict:
    """One experiment as `dvc exp show --json` lists it."""
    data = {"params": {"params.yaml": {"data": params}},
            "metrics": {path: {"data": values} for path, values in metrics.items()}}
    return {"executor": {"state": state}, "name": name,
            "revs": [{"rev": f"{name}-rev", "name": name, "data": data, "error": error}]}


EVAL = {"val_loss": 1.9, "bits_per_byte": 2.7, "tokens_per_sec": 9e4}
TRAIN = {"final_val_loss": 1.95, "tokens_per_sec": 4e4}
SHOWN = [
    {"rev": "workspace", "data": {"params": {"params.yaml": {"data": {
        "seed": 1337, "model": {"norm": "layernorm"}}}}}, "experiments": None},
    {"rev": "abc123", "name": "main", "data": {}, "experiments": [
        shown_revision("done", {"seed": 1, "model": {"norm": "rmsnorm"}},
                       {"metrics/eval.json": EVAL, "metrics/train.json": TRAIN}),
        shown_revision("queued", {"seed": 2, "model": {"norm": "rmsnorm"}},
                       {"metrics/eval.json": EVAL}, state="queued"),
        shown_revision("broken", {"seed": 3, "model": {"norm": "rmsnorm"}}, {},
                       state="failed"),
        shown_revision("erred", {"seed": 4, "model": {"norm": "rmsnorm"}},
                       {"metrics/eval.json": EVAL}, error={"msg": "boom"}),
    ]},
]


def test_experiments_are_read_with_dotted_params_and_flat_metrics():
    found = parse_experiments(SHOWN)
    assert [experiment.name for experiment in found.finished] == ["done"]
    done = found.finished[0]
    assert done.rev == "done-rev"
    assert done.params == {"seed": 1, "model.norm": "rmsnorm"}
    # Every value by file and key; by key alone too where no other file has that key.
    assert done.metrics == {"eval.val_loss": 1.9, "eval.bits_per_byte": 2.7,
                            "eval.tokens_per_sec": 9e4, "train.final_val_loss": 1.95,
                            "train.tokens_per_sec": 4e4, "val_loss": 1.9, "bits_per_byte": 2.7,
                            "final_val_loss": 1.95}
    assert found.workspace == {"seed": 1337, "model.norm": "layernorm"}


def test_a_key_that_is_also_a_files_qualified_name_is_not_given_bare():
    metrics = {"metrics/train.json": {"data": {"loss": 1.0}},
               "metrics/eval.json": {"data": {"loss": 2.0, "train": {"loss": 3.0}}}}
    # "train.loss" is train.json's loss, and eval.json's nested train.loss keeps its file name.
    assert flat_metrics({"metrics": metrics}) == {"train.loss": 1.0, "eval.loss": 2.0,
                                                  "eval.train.loss": 3.0}


def test_queued_failed_and_erred_experiments_are_unfinished_even_with_metrics():
    assert parse_experiments(SHOWN).unfinished == ["queued", "broken", "erred"]


def test_a_failing_dvc_is_one_line(tmp_path):
    with pytest.raises(GptlabError, match=r"^dvc exp show failed: .+"):
        read_experiments(tmp_path)  # not a DVC repository


# --- a queued experiment whose worker is killed -----------------------------------------------

KILLED_RUN = {"seed": 7, "train.max_iters": 80, "train.checkpoint_interval": 10}


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def kill_session(session: int) -> None:
    """SIGKILL every process of a session: the queue's worker puts each run in a process group
    of its own, so killing the worker's group would leave its run going."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def test_only_queued_runs_whose_process_is_gone_are_stale():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process

    def run(name: str, pid: int, state: str = "running", executor: str = "dvc-task") -> dict:
        return {"name": name, "revs": [{"rev": name * 8, "name": name}],
                "executor": {"state": state, "name": executor, "local": {"pid": pid}}}

    shown = [{"rev": "workspace", "experiments": [
        run("dead", gone.pid), run("alive", os.getpid()), run("done", gone.pid, "success"),
        run("shell", gone.pid, executor="workspace")]}]
    assert [(run.name, run.rev) for run in stale_runs(shown)] == [("dead", "dead" * 8)]


def test_a_queued_run_whose_worker_is_killed_is_recovered_by_one_command(pipeline, tmp_path):
    """The worker, its run and its stages SIGKILLed mid-training (an out-of-memory kill, a
    machine put to sleep): DVC shows the run Running for good with its parent's metrics;
    `gptlab recover` reruns it from its checkpoint to an uninterrupted run's metrics."""
    project = with_venv(copy_project(pipeline[0], tmp_path))
    overrides = [item for key, value in KILLED_RUN.items() for item in ("-S", f"{key}={value}")]
    dvc(project, "exp", "run", "--queue", "-n", "killed", *overrides)
    runs = project / ".gptlab" / "runs"
    known = set(runs.iterdir())
    env = {"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(project.parent),
           **PASSIVE_THREADS}
    worker = subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start"], cwd=project,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    wait_for(lambda: any(run.glob("step-*") for run in set(runs.iterdir()) - known), 120,
             "the queued run's first checkpoint")
    kill_session(worker.pid)
    worker.wait()
    experiments = read_experiments(project)  # DVC shows it running, with its parent's metrics
    assert "killed" in experiments.unfinished  # compare, scaling and report never count it
    assert "killed" not in {run.name for run in experiments.finished}

    recovered = gptlab(project, "recover")
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stdout.strip() == "queued again and started: killed"
    # Polled through git, not dvc: each dvc call would take a core from the run.
    wait_for(lambda: "/killed\n" in git_output(project, "for-each-ref", "--format=%(refname)",
                                                "refs/exps"), 180, "the rerun")
    logs = (project / ".dvc" / "tmp" / "exps" / "run").glob("*/*.out")
    assert any("resuming from step" in log.read_text() for log in logs)

    reference = tmp_path / "uninterrupted"
    shutil.copytree(project / "data" / "tokens", reference / "data" / "tokens")
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(reference, with_overrides(params, KILLED_RUN))
    assert run_stage("train", reference).returncode == 0
    expected = json.loads((reference / "metrics" / "train.json").read_text())
    experiments = read_experiments(project)
    assert "killed" not in experiments.unfinished  # no failed row beside its rerun
    recovered_metrics = next(run.metrics for run in experiments.finished if run.name == "killed")
    for key in ("final_train_loss", "final_val_loss", "best_val_loss"):
        assert recovered_metrics[key] == expected[key], key


def test_unflatten_is_the_inverse_of_flatten():
    nested = {"seed": 1, "model": {"n_layer": 2, "norm": "rmsnorm"}, "train": {"lora": {"rank": 0}}}
    assert flatten(nested)["train.lora.rank"] == 0
    assert unflatten(flatten(nested)) == nested
