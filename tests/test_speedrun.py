"""The CPU speedrun's study: the experiments it queues (for real, in a DVC project), and the
records table it writes from finished ones."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest
import yaml
from helpers import ROOT, commit, dvc, git, gptlab, make_project, with_venv

from gptlab.errors import GptlabError
from gptlab.lab.experiments import (
    Experiment,
    Experiments,
    flatten,
    read_experiments,
    unflatten,
)
from gptlab.lab.speedrun import (
    BY_NAME,
    LOSS,
    PRESET,
    RECIPES,
    WALL,
    records,
    render_records,
    settings_of,
    study_overrides,
    study_runs,
)
from gptlab.lab.stats import below_target, summarize
from gptlab.params import Params

NANOGPT_PRESET = ROOT / "src" / "gptlab" / "presets" / "nanogpt-cpu.yaml"
WORKSPACE = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
PRESET_PARAMS = flatten(yaml.safe_load(PRESET.read_text()))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_each_recipe_is_the_preset_with_its_changes_on_any_workspace(recipe):
    overrides = study_overrides(WORKSPACE, recipe, 7, {})
    ran = {**WORKSPACE, **overrides}
    Params.model_validate(unflatten(ran))  # what the experiment's params.yaml will hold
    assert ran == {**PRESET_PARAMS, **recipe.overrides, "seed": 7}
    # Only what differs from the workspace is set: on the preset itself, the recipe and seed.
    on_preset = study_overrides(PRESET_PARAMS, recipe, 7, {})
    assert on_preset == {key: value for key, value in {**recipe.overrides, "seed": 7}.items()
                         if PRESET_PARAMS[key] != value}


def recipe_of(params: dict[str, Any]) -> dict[str, Any]:
    """The model and training sections of flattened params: what a recipe is."""
    return {k: v for k, v in params.items() if k.startswith(("model.", "train."))}


def test_the_recipes_undo_the_preset_and_the_default_is_the_speedrun_without_qk_norm():
    for recipe in RECIPES:
        if recipe.kind == "left out":
            assert all(PRESET_PARAMS[key] != value for key, value in recipe.overrides.items())
        if recipe.base == "nanogpt":  # one component on top of nanoGPT's recipe
            assert recipe.overrides.keys() >= BY_NAME["nanogpt"].overrides.keys()
    # The nanogpt recipe is nanoGPT's CPU recipe as its preset has it, data and scoring too.
    nanogpt = {**PRESET_PARAMS, **BY_NAME["nanogpt"].overrides}
    assert nanogpt == flatten(yaml.safe_load(NANOGPT_PRESET.read_text()))
    # The default params.yaml trains the speedrun's recipe but for QK-norm, which no Hugging
    # Face layout has (`gptlab export` of the default model works).
    assert recipe_of(WORKSPACE) == recipe_of({**PRESET_PARAMS,
                                              **BY_NAME["no-qk-norm"].overrides})


def test_settings_are_yaml_values_checked_before_anything_is_queued():
    assert settings_of(["data.source=local", "data.sha256=null", "train.lr=0.5"]) == {
        "data.source": "local", "data.sha256": None, "train.lr": 0.5}
    with pytest.raises(GptlabError, match=r"^--set: 'data\.source' is not KEY=VALUE$"):
        settings_of(["data.source"])
    with pytest.raises(GptlabError, match=r"^--set: unknown key 'train\.lrr'$"):
        study_overrides(WORKSPACE, BY_NAME["record"], 1, {"train.lrr": 1.0})
    with pytest.raises(GptlabError, match=r"^speedrun-tied-1: train.max_iters: .*got -1"):
        study_overrides(WORKSPACE, BY_NAME["tied"], 1, {"train.max_iters": -1})


def test_queue_puts_each_recipe_and_seed_in_dvcs_queue_with_its_params(tmp_path):
    project = with_venv(make_project(tmp_path))
    git(project, "init", "-q")
    for key, value in (("user.name", "gptlab tests"), ("user.email", "tests@gptlab")):
        git(project, "config", key, value)  # DVC commits queued experiments as this user
    commit(project, "init")
    queued = gptlab(project, "speedrun", "--queue", "--recipes", "tied,no-muon", "--seeds", "5,6",
                    "--set", "data.source=local", "--set", "data.spec=text.txt")
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.startswith("queued 4 experiments (speedrun-tied-5 to speedrun-no-muon-6)")
    shown = json.loads(dvc(project, "exp", "show", "--json"))
    params = {entry["name"]: flatten(entry["revs"][0]["data"]["params"]["params.yaml"]["data"])
              for baseline in shown for entry in baseline.get("experiments") or []}
    assert set(params) == {"speedrun-tied-5", "speedrun-tied-6", "speedrun-no-muon-5",
                           "speedrun-no-muon-6"}
    tied = params["speedrun-tied-6"]
    assert tied == {**PRESET_PARAMS, "model.tie_weights": True, "seed": 6,
                    "data.source": "local", "data.spec": "text.txt"}
    assert params["speedrun-no-muon-5"]["train.optimizer"] == "adamw"
    assert read_experiments(project).unfinished  # queued, not run: no results yet
    bad = gptlab(project, "speedrun", "--queue", "--recipes", "record,fast")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1].startswith("error: --recipes: unknown fast (known: ")


def experiment(recipe: str, seed: int, loss: float, wall: float) -> Experiment:
    params = {**PRESET_PARAMS, **BY_NAME[recipe].overrides, "seed": seed}
    return Experiment(f"speedrun-{recipe}-{seed}", f"{seed:040d}", params,
                      {LOSS: loss, WALL: wall, "train.tokens_per_sec": 1.0})


RECORD_LOSSES = [1.83, 1.84, 1.85, 1.82, 1.86]
NO_MUON_LOSSES = [2.01, 2.02, 2.00, 2.03, 2.04]
STUDY = Experiments(
    finished=[*(experiment("record", seed, loss, 40.0 + seed)
                for seed, loss in zip(range(5), RECORD_LOSSES, strict=True)),
              *(experiment("no-muon", seed, loss, 30.0)
                for seed, loss in zip(range(5), NO_MUON_LOSSES, strict=True)),
              experiment("softcap", 0, 1.84, 41.0), experiment("softcap", 1, 1.85, 43.0),
              *(experiment("nanogpt", seed, 1.90 + seed / 100, 95.0 + seed) for seed in range(3)),
              *(experiment("nanogpt-muon", seed, 1.85 + seed / 100, 120.0) for seed in range(3)),
              *(experiment("fewer-evals", seed, loss, 36.0)
                for seed, loss in zip(range(5), RECORD_LOSSES, strict=True)),
              Experiment("other-run", "f" * 40, {}, {LOSS: 9.0})],
    unfinished=["scale-1e10-1x8"], workspace={})


def test_records_give_each_recipe_its_mean_test_against_the_target_and_effect():
    study = records(study_runs(STUDY), target=1.9)
    rows = {row["recipe"]: row for row in study["recipes"]}
    assert list(rows) == ["record", "fewer-evals", "nanogpt", "no-muon", "softcap",
                          "nanogpt-muon"]  # RECIPES' order

    record = rows["record"]
    assert record["n"] == 5 and record["seeds"] == [0, 1, 2, 3, 4]
    assert record["mean"] == pytest.approx(statistics.fmean(RECORD_LOSSES))
    assert record["p_below_target"] == pytest.approx(
        below_target(summarize(RECORD_LOSSES), 1.9).p_value)
    assert record["p_below_target"] < 0.01 and record["reaches_target"]
    assert record["wall_seconds"] == 42.0 and record["wall_range"] == [40.0, 44.0]
    assert (record["steps"], record["batch_size"]) == (280, 32) and record["vs_base"] is None
    no_muon = rows["no-muon"]
    assert no_muon["base"] == "record" and no_muon["vs_base"]["diff"] == pytest.approx(0.18)
    low, high = no_muon["vs_base"]["ci95"]
    assert 0 < low < 0.18 < high and no_muon["vs_base"]["p_value"] < 0.001
    # A component added to nanoGPT's recipe is measured against nanoGPT's recipe.
    muon = rows["nanogpt-muon"]
    assert muon["base"] == "nanogpt" and muon["vs_base"]["diff"] == pytest.approx(-0.05)
    assert rows["nanogpt"]["base"] == "record"  # nanoGPT's recipe against the record's
    assert not no_muon["reaches_target"]
    # Two seeds have a mean below the target, but two are not five: no record.
    assert rows["softcap"]["n"] == 2 and not rows["softcap"]["reaches_target"]
    assert (rows["nanogpt"]["steps"], rows["nanogpt"]["batch_size"]) == (2000, 12)


def test_the_records_table_shows_the_ladder_and_each_components_verdict():
    text = render_records(records(study_runs(STUDY), target=1.9))
    lines = text.splitlines()
    assert lines[0] == ("| # | recipe | steps x sequences | training time | mean loss (seeds) | "
                        "p (below 1.9) |")
    assert lines[2] == "| 1 | nanoGPT's recipe | 2000 x 12 | 96.0 s | 1.9100 (3) | 0.887 |"
    assert lines[3] == ("| 2 | the speedrun preset | 280 x 32 | 42.0 s (0.44x) | 1.8400 (5) | "
                        "<0.001 |")
    # Each further row of the ladder, in RECIPES' order, its time against nanoGPT's recipe's.
    assert lines[4] == ("| 3 | the preset, evaluated every 140 steps on 10 batches while it "
                        "trains | 280 x 32 | 36.0 s (0.38x) | 1.8400 (5) | <0.001 |")
    assert lines[5] == ""
    no_muon = next(line for line in lines if line.startswith("| without Muon"))
    assert no_muon.endswith("| <0.001 | 30.0 s | helps |")
    assert "| +0.180 (" in no_muon and "| 2.0200 (2.0000-2.0400) |" in no_muon
    softcap = next(line for line in lines if line.startswith("| with logit soft-cap 30"))
    assert softcap.endswith("| no measurable effect |")
    # The components added to nanoGPT's recipe get a table of their own, after the preset's.
    title = lines.index("| change to nanoGPT's recipe | mean loss (range) | difference (95% "
                        "interval) | p | training time | verdict |")
    assert lines.index(softcap) < title and len(lines) == title + 3
    assert lines[-1] == ("| with Muon on the blocks' matrices (at 0.02) | 1.8600 (1.8500-1.8700) | "
                         "-0.050 (-0.073, -0.027) | 0.00360 | 120.0 s | helps |")


def test_an_unfinished_run_or_no_record_is_one_line():
    waiting = Experiments(STUDY.finished, ["speedrun-tied-3"], {})
    with pytest.raises(GptlabError, match=r"^experiment speedrun-tied-3 of the study has no "
                                          r"results: still queued or running"):
        study_runs(waiting)
    without_record = Experiments([e for e in STUDY.finished if "record" not in e.name], [], {})
    with pytest.raises(GptlabError, match=r"^no finished experiments of the record's recipe"):
        study_runs(without_record)
    twice = Experiments([*STUDY.finished, Experiment("speedrun-record-1", "b" * 40, {},
                                                      {LOSS: 1.8, WALL: 40.0}, "c" * 40)], [], {})
    with pytest.raises(GptlabError, match=r"^experiment speedrun-record-1 ran on two commits "
                                          r"\(0000000, ccccccc\)"):
        study_runs(twice)
    no_wall = Experiments([Experiment("speedrun-record-1", "a" * 40, {}, {LOSS: 1.8})], [], {})
    with pytest.raises(GptlabError, match=r"^experiment speedrun-record-1: no train\.wall_seconds"):
        study_runs(no_wall)
