"""The project's DVC experiments, as gptlab's lab commands read them.

gptlab keeps no record of its own: an experiment is what `dvc exp show --json` says it is, its
params (params.yaml, dotted keys) and the numbers of its metrics files. Every metric is named
by its file and key (`eval.val_loss`, `train.tokens_per_sec`), and also by its key alone where
no other file has that key (`val_loss`, but not `tokens_per_sec`).

A queued experiment whose worker was killed (out of memory, a machine put to sleep) stays
`Running` in DVC for good: `recover` finds such runs and runs them again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from gptlab.errors import GptlabError
from gptlab.params import PARAMS_FILE

# What a queued run's result depends on besides its params: a rerun on other code is another run.
RUN_CODE = ("src", "stages", "dvc.yaml", "requirements.lock")
# How `dvc exp show --json` names the executor of an experiment run by `dvc queue start`.
QUEUE_EXECUTOR = "dvc-task"


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str  # the experiment's commit
    params: dict[str, Any]
    metrics: dict[str, Any]
    base: str | None = None  # the commit it was based on, whose code it ran


@dataclass(frozen=True)
class Experiments:
    """The experiments with results, those without (queued, running or failed), and the
    params of the workspace and the commit it is on."""

    finished: list[Experiment]
    unfinished: list[str]
    workspace: dict[str, Any]
    head: str | None = None  # the workspace's commit; None where not known


def read_experiments(project: Path = Path("."), all_commits: bool = False) -> Experiments:
    """The experiments of the current commit (of every commit with `all_commits`)."""
    shown = dvc(project, "exp", "show", "--json", *(["--all-commits"] if all_commits else []))
    # DVC lists the commits of --all-commits in no order that tells which one is HEAD.
    head = git_output(project, "rev-parse", "HEAD").strip()
    return parse_experiments(json.loads(shown), head)


def dvc(project: Path, *args: str) -> str:
    """The output of `dvc ARGS` in `project`; a failure is one line, DVC's last."""
    # The queue's workers run `dvc` by name: this environment's must come first on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    # Files, not pipes: a worker that `dvc queue start` leaves running inherits them, and a
    # pipe would make this wait for the worker to end.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                              stdin=subprocess.DEVNULL, stdout=out, stderr=err).returncode
        out.seek(0), err.seek(0)
        output, errors = out.read(), err.read()
    if code != 0:
        last = (errors.strip().splitlines() or ["no output"])[-1]
        raise GptlabError(f"dvc {' '.join(args[:2])} failed: {last}")
    return output


def parse_experiments(shown: list[dict[str, Any]], head: str | None = None) -> Experiments:
    """What `dvc exp show --json` printed, as Experiments; `head` is the workspace's commit."""
    finished, unfinished, workspace = [], [], {}
    for baseline in shown:
        if baseline["rev"] == "workspace":
            workspace = flat_params(baseline.get("data") or {})
        for entry in baseline.get("experiments") or []:
            revision = entry["revs"][0]
            name = entry.get("name") or revision.get("name") or revision["rev"][:7]
            metrics = flat_metrics(revision.get("data") or {})
            # A queued, running or failed run (executor state) may show its baseline's files.
            state = (entry.get("executor") or {}).get("state", "success")
            if state != "success" or revision.get("error") or not metrics:
                unfinished.append(name)
            else:
                params = flat_params(revision["data"])
                finished.append(Experiment(name, revision["rev"], params, metrics,
                                           baseline["rev"]))
    return Experiments(finished, unfinished, workspace, head)


def flat_params(data: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's values by dotted key: {"model.norm": "rmsnorm", "seed": 1}."""
    nested = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
    return flatten(nested)


def flat_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """Every metrics file's values by file stem and key, and by key alone where that names
    one value only."""
    files = {PurePosixPath(path).stem: flatten(content.get("data") or {})
             for path, content in (data.get("metrics") or {}).items()}
    qualified = {f"{stem}.{key}": value for stem, values in files.items()
                 for key, value in values.items()}
    counts = Counter(key for values in files.values() for key in values)
    bare = {key: value for values in files.values() for key, value in values.items()
            if counts[key] == 1 and key not in qualified}
    return qualified | bare


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys back into nested sections: the inverse of `flatten`."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        inner = nested
        for section in sections:
            inner = inner.setdefault(section, {})
        inner[leaf] = value
    return nested


# --- queued runs whose worker died ----------------------------------------------------------


@dataclass(frozen=True)
class StaleRun:
    """A queued experiment DVC still calls running, though no process runs it any more."""

    name: str
    rev: str  # the commit DVC queued it as: its params and code


def stale_runs(shown: list[dict[str, Any]]) -> list[StaleRun]:
    """The experiments `dvc exp show --json` calls running whose process is gone."""
    stale = []
    for baseline in shown:
        for entry in baseline.get("experiments") or []:
            executor = entry.get("executor") or {}
            pid = (executor.get("local") or {}).get("pid")
            queued = executor.get("name") == QUEUE_EXECUTOR  # not `dvc exp run` in a shell
            if queued and executor.get("state") == "running" and not process_alive(pid):
                revision = entry["revs"][0]
                stale.append(StaleRun(entry.get("name") or revision["rev"][:7], revision["rev"]))
    return stale


def process_alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a zombie, killed and never reaped, does not)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: kill(0) is all there is
    return state != "Z"


def recover(project: Path = Path(".")) -> list[str]:
    """Mark each stale run failed, queue it again under its name with the params it was queued
    with, and start the queue; the names queued again. Its train stage resumes from the run's
    last checkpoint, in the project's cache."""
    stale = stale_runs(json.loads(dvc(project, "exp", "show", "--json")))
    requeue = {run.name: queued_overrides(project, run) for run in stale}
    for name, overrides in requeue.items():
        dvc(project, "queue", "kill", name)  # its process is gone: DVC marks the task failed
        dvc(project, "queue", "remove", name)  # so no listing shows it beside its rerun
        queue_experiment(name, overrides, project)
    if requeue:
        dvc(project, "queue", "start")
    return list(requeue)


def queue_experiment(name: str, overrides: dict[str, Any], project: Path = Path(".")) -> None:
    """Queue the experiment `name` with the params `overrides` (by dotted key) set on the
    workspace's; `dvc queue start` runs it."""
    # JSON values are values of DVC's override grammar: quoted strings, lists, null.
    settings = [item for key, value in overrides.items()
                for item in ("-S", f"{key}={json.dumps(value)}")]
    try:
        dvc(project, "exp", "run", "--queue", "-n", name, *settings)
    except GptlabError as error:
        raise GptlabError(f"queueing {name} failed: {error}") from None


def queued_overrides(project: Path, run: StaleRun) -> dict[str, Any]:
    """The params the run was queued with that differ from the workspace's."""
    changed = git_output(project, "diff", "--name-only", run.rev, "--", *RUN_CODE)
    if changed:
        raise GptlabError(f"{run.name}: was queued with code the workspace no longer has "
                          f"({', '.join(changed.split())}); queue it again yourself")
    queued = flatten(yaml.safe_load(git_output(project, "show", f"{run.rev}:{PARAMS_FILE}")))
    here = flatten(yaml.safe_load((project / PARAMS_FILE).read_text(encoding="utf-8")))
    if set(here) - set(queued):
        raise GptlabError(f"{run.name}: its params lack {sorted(set(here) - set(queued))}, "
                          f"which the workspace's {PARAMS_FILE} has; queue it again yourself")
    return {key: value for key, value in queued.items() if here.get(key, object()) != value}


def git_output(project: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True,
                              check=True).stdout
    except subprocess.CalledProcessError as error:
        raise GptlabError(f"git {args[0]} failed: {error.stderr.strip()}") from None
