"""The `gptlab` command's first minutes: outside a project it says so in one line, and its
built-in sampling settings are the project's defaults."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from helpers import ROOT, gptlab, one_error_line

from gptlab.cli import BUILTIN_SAMPLE, SAMPLING_DEFAULTS, require_project
from gptlab.errors import GptlabError
from gptlab.lab.report import experiment_commit
from gptlab.paramdocs import schema_fields
from gptlab.params import is_section, load_params


@pytest.mark.parametrize("command", [
    ["sample"], ["chat"], ["serve"], ["report"], ["report", "--exp", "exp-a"], ["compare"],
    ["scaling"], ["recover"], ["stages"], ["params"], ["params", "--comments"],
])
def test_a_project_command_outside_a_project_says_so(tmp_path, command):
    result = gptlab(tmp_path, *command)
    assert one_error_line(result) == (f"error: not a gptlab project (no dvc.yaml here or "
                                      f"above): {tmp_path}")


@pytest.mark.parametrize("command", [
    ["sample", "--models", "elsewhere"], ["params", "other.yaml"], ["tokens", "train.bin"],
])
@pytest.mark.slow
def test_commands_given_their_files_run_anywhere(tmp_path, command):
    # They fail on the missing file they were given, not on the folder they run in.
    assert "not a gptlab project" not in one_error_line(gptlab(tmp_path, *command))


def test_a_folder_inside_a_project_is_in_the_project(tmp_path):
    require_project(ROOT / "src" / "gptlab")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    require_project(tmp_path / "a" / "b")
    with pytest.raises(GptlabError, match="not a gptlab project"):
        require_project(tmp_path.parent)


def test_the_builtin_sampling_settings_are_the_projects_defaults():
    shipped = load_params(ROOT / "params.yaml").sample
    assert shipped.model_copy(update={"prompts": ["\n"], "num_samples": 1}) == BUILTIN_SAMPLE
    assert (f"one sample of {shipped.max_new_tokens} tokens after a newline, temperature "
            f"{shipped.temperature}, top_k {shipped.top_k}, seed {shipped.seed}"
            in SAMPLING_DEFAULTS)


def test_a_mistyped_experiment_lists_only_experiments(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    commit = git("rev-parse", "HEAD")
    # What DVC leaves under refs/exps beside its experiments, during and after a queued run.
    for ref in ("EXEC_APPLY", "EXEC_HEAD", "ORIG_HEAD", "stash", "celery/failed/abc",
                f"{commit[:2]}/{commit[2:]}/exp-a"):
        git("update-ref", f"refs/exps/{ref}", commit)
    assert experiment_commit("exp-a", tmp_path) == commit
    with pytest.raises(GptlabError, match=r"'exp-b' \(experiments: exp-a\)$"):
        experiment_commit("exp-b", tmp_path)


def exps_columns_kept(columns: set[str]) -> set[str]:
    """The columns `make exps` keeps, dropped as `dvc exp show --drop` drops them."""
    recipe = (ROOT / "Makefile").read_text().split("\nexps:")[1].split("\n\n")[0]
    drops = [pattern.replace("$$", "$") for pattern in re.findall(r"--drop '([^']*)'", recipe)]
    dropped = re.compile("|".join(drops))
    return {column for column in columns if not dropped.match(column)}


def test_make_exps_shows_params_and_the_metrics_that_compare_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    files = {next(iter(entry)) if isinstance(entry, dict) else entry
             for stage in stages for entry in [*stage.get("deps", []), *stage.get("outs", [])]}
    metrics = {name for stage in stages for entry in stage.get("metrics", [])
               for name in json.loads((ROOT / next(iter(entry))).read_text())}
    params = {key for key, field in schema_fields().items() if not is_section(field.annotation)}
    assert exps_columns_kept(files | {"Created", "State", "Executor"}) == set()  # hashes
    assert exps_columns_kept(params) == params
    kept = exps_columns_kept(metrics)
    assert {"val_loss", "bits_per_byte", "parameters", "vocab_size"} <= kept
    # Timings and memory differ on every run; the rest say the same as what is kept.
    assert not kept & {"mfu", "wall_seconds", "tokens_per_sec", "peak_memory_mb",
                       "trainable_parameters", "perplexity", "tokens", "final_val_loss"}
