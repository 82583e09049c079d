"""The project's DVC experiments, as gptlab's lab commands read them.

gptlab keeps no record of its own: an experiment is what `dvc exp show --json` says it is, its
params (params.yaml, dotted keys) and the numbers of its metrics files. Every metric is named
by its file and key (`eval.val_loss`, `train.tokens_per_sec`), and also by its key alone where
no other file has that key (`val_loss`, but not `tokens_per_sec`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gptlab.errors import GptlabError
from gptlab.params import PARAMS_FILE


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str  # the experiment's commit
    params: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Experiments:
    """The experiments with results, those without (queued, running or failed), and the
    params of the workspace."""

    finished: list[Experiment]
    unfinished: list[str]
    workspace: dict[str, Any]


def read_experiments(project: Path = Path("."), all_commits: bool = False) -> Experiments:
    """The experiments of the current commit (of every commit with `all_commits`)."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    if all_commits:
        command.append("--all-commits")
    try:
        result = subprocess.run(command, cwd=project, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as error:
        last = (error.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptlabError(f"dvc exp show failed: {last}") from None
    return parse_experiments(json.loads(result.stdout))


def parse_experiments(shown: list[dict[str, Any]]) -> Experiments:
    """What `dvc exp show --json` printed, as Experiments."""
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
                finished.append(Experiment(name, revision["rev"], params, metrics))
    return Experiments(finished, unfinished, workspace)


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
