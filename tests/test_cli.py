"""The `gptlab` command's first minutes: outside a project it says so in one line, and its
built-in sampling settings are the project's defaults."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from helpers import ROOT, gptlab, one_error_line

from gptlab.cli import BUILTIN_SAMPLE, SAMPLING_DEFAULTS, comparable_runs, main, require_project
from gptlab.errors import GptlabError
from gptlab.lab.experiments import parse_experiments
from gptlab.lab.report import experiment_commit
from gptlab.lab.stats import compare, group_runs, holm
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


# --- gptlab compare, on experiments as `dvc exp show --json` lists them -------------------------

OLD, NEW = "1a2b3c4d5e6f" + "0" * 28, "9f8e7d6c5b4a" + "0" * 28


def shown(name: str, norm: str, seed: int, metrics: dict, state: str = "success") -> dict:
    data = {"params": {"params.yaml": {"data": {"seed": seed, "model": {"norm": norm}}}},
            "metrics": {"metrics/eval.json": {"data": metrics}}}
    return {"executor": {"state": state}, "name": name,
            "revs": [{"rev": f"{name}-rev", "name": name, "data": data, "error": None}]}


def shown_commits(experiments: dict[str, list[dict]]) -> list[dict]:
    """The workspace, which trains layernorm, and the experiments of each commit."""
    workspace = {"params": {"params.yaml": {"data": {"seed": 1337,
                                                     "model": {"norm": "layernorm"}}}}}
    return [{"rev": "workspace", "data": workspace, "experiments": None},
            *({"rev": commit, "data": {}, "experiments": runs}
              for commit, runs in experiments.items())]


def losses(val_loss: float) -> dict:
    return {"val_loss": val_loss, "bits_per_byte": val_loss * 1.44}


def test_an_experiment_without_one_metric_still_counts_for_the_others(capsys):
    found = parse_experiments(shown_commits({NEW: [
        shown("full-1", "rmsnorm", 1, losses(1.90)), shown("full-2", "rmsnorm", 2, losses(1.94)),
        shown("loss-only", "rmsnorm", 3, {"val_loss": 1.92}),
        shown("speed-only", "rmsnorm", 4, {"tokens_per_sec": 9e4}),
        shown("queued", "rmsnorm", 5, {}, state="queued")]}))
    runs = comparable_runs(found, ["val_loss", "bits_per_byte"])
    assert [run.name for run in runs] == ["full-1", "full-2", "loss-only"]
    assert capsys.readouterr().err.splitlines() == [
        "note: left out 2 experiments without results: queued, speed-only",
        "note: bits_per_byte: left out 1 experiment without it: loss-only"]
    loss, bits = compare(group_runs(runs), ["val_loss", "bits_per_byte"])
    assert [row.summary.n for row in loss.rows] == [3]
    assert loss.rows[0].summary.mean == pytest.approx((1.90 + 1.94 + 1.92) / 3)
    assert [run.name for run in bits.rows[0].group.runs] == ["full-1", "full-2"]


def compare_json(monkeypatch, capsys, tmp_path, shown_json: list[dict], *options: str) -> dict:
    """`gptlab compare --json OPTIONS` in a project whose DVC shows `shown_json`, on NEW."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gptlab.cli.read_experiments",
                        lambda all_commits: parse_experiments(shown_json, head=NEW))
    main(["compare", "--json", "--metric", "val_loss", *options])
    return json.loads(capsys.readouterr().out)["val_loss"]


def test_experiments_of_different_commits_never_share_a_group(monkeypatch, capsys, tmp_path):
    shown_json = shown_commits({
        OLD: [shown("old-ln-1", "layernorm", 1, losses(2.00)),
              shown("old-ln-2", "layernorm", 2, losses(2.02)),
              shown("old-rms-1", "rmsnorm", 1, losses(1.90))],
        NEW: [shown("new-ln-1", "layernorm", 1, losses(1.80)),
              shown("new-ln-2", "layernorm", 2, losses(1.83))]})
    table = compare_json(monkeypatch, capsys, tmp_path, shown_json, "--all-commits")
    # The baseline is the workspace's params on the workspace's commit, not an older one.
    assert table["baseline"] == "model.norm=layernorm @9f8e7d6"
    rows = {row["group"]: row for row in table["rows"]}
    assert {group: row["runs"] for group, row in rows.items()} == {
        "model.norm=layernorm @9f8e7d6": ["new-ln-1", "new-ln-2"],
        "model.norm=layernorm @1a2b3c4": ["old-ln-1", "old-ln-2"],
        "model.norm=rmsnorm @1a2b3c4": ["old-rms-1"]}
    assert rows["model.norm=layernorm @1a2b3c4"]["vs_baseline"]["diff"] == pytest.approx(
        (2.00 + 2.02) / 2 - (1.80 + 1.83) / 2)


def test_compare_correct_holm_adjusts_the_p_values(monkeypatch, capsys, tmp_path):
    shown_json = shown_commits({NEW: [
        shown(f"{norm}-{seed}", norm, seed, losses(loss + seed / 100))
        for norm, loss in [("layernorm", 2.0), ("rmsnorm", 1.96), ("scalenorm", 2.03),
                           ("nonorm", 2.1)] for seed in (1, 2, 3)]})
    table = compare_json(monkeypatch, capsys, tmp_path, shown_json, "--correct", "holm")
    assert table["correction"] == "holm"
    tested = [row["vs_baseline"] for row in table["rows"] if row["vs_baseline"] is not None]
    assert len(tested) == 3
    assert [versus["p_adjusted"] for versus in tested] == holm(
        [versus["p_value"] for versus in tested])


def test_scaling_refuses_too_few_resamples_for_an_interval(tmp_path):
    result = gptlab(tmp_path, "scaling", "--samples", "5")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "argument --samples: expected an integer >= 40, got '5'")
