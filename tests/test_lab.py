"""The lab's commands on real DVC experiments, queued and run in a temporary git repo: `gptlab
compare` (seed statistics), `gptlab report` (a run's card) and `gptlab scaling` (a sweep queued,
then fitted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import copy_project, dvc, dvc_run, gptlab, with_venv

from gptlab.lab.experiments import read_experiments

# Two budgets, three shapes at each from a ladder of four: 6 runs of 8 to 48 steps.
SWEEP = ("--budgets", "3.8e7,1.1e8", "--shapes", "1x16,2x16,1x32,2x32", "--per-budget", "3")


@pytest.fixture(scope="module")
def lab(pipeline, tmp_path_factory) -> Path:
    """The pipeline's project after two seeds of each of two norms, and a scaling sweep of two
    isoFLOP profiles of three shapes, ran as queued experiments."""
    project = with_venv(copy_project(pipeline[0], tmp_path_factory.mktemp("lab")))
    dvc(project, "exp", "run", "--queue", "-S", "seed=1,2", "-S", "model.norm=layernorm,rmsnorm")
    queued = gptlab(project, "scaling", "--queue", *SWEEP)
    assert queued.returncode == 0, queued.stderr
    assert "queued 6 experiments" in queued.stdout
    dvc(project, "exp", "run", "--run-all", "--jobs", "2")
    return project


def test_compare_groups_the_seeds_of_each_choice_against_the_workspace(lab):
    result = gptlab(lab, "compare", "--json")
    assert result.returncode == 0, result.stderr
    assert "left out the scaling sweep's 6 experiments (scale-*)" in result.stderr
    found = read_experiments(lab)
    by_norm = {norm: [e for e in found.finished if e.params.get("model.norm") == norm
                      and not e.name.startswith("scale-")] for norm in ("layernorm", "rmsnorm")}
    for metric, table in json.loads(result.stdout).items():
        # The workspace trains layernorm: that group is the baseline.
        assert table["baseline"] == "model.norm=layernorm"
        rows = {row["group"]: row for row in table["rows"]}
        assert set(rows) == {"model.norm=layernorm", "model.norm=rmsnorm"}
        means = {}
        for norm, runs in by_norm.items():
            row = rows[f"model.norm={norm}"]
            assert sorted(row["runs"]) == sorted(e.name for e in runs) and row["n"] == 2
            means[norm] = sum(e.metrics[metric] for e in runs) / 2
            assert row["mean"] == pytest.approx(means[norm], rel=1e-12)
            low, high = row["ci95"]
            assert low < row["mean"] < high
        versus = rows["model.norm=rmsnorm"]["vs_baseline"]
        assert versus["diff"] == pytest.approx(means["rmsnorm"] - means["layernorm"])
        assert 0 <= versus["p_value"] <= 1
        assert [row["mean"] for row in table["rows"]] == sorted(means.values())
    text = gptlab(lab, "compare", "--metric", "val_loss", "--target", "100")
    assert text.returncode == 0, text.stderr
    assert "val_loss (baseline: model.norm=layernorm; target: 100)" in text.stdout
    # Every group's loss is far below 100: the column says it, each p below 0.01.
    rows = [line.split() for line in text.stdout.splitlines()
            if line.startswith("model.norm=")]
    assert len(rows) == 2 and all(float(row[-2]) < -90 and row[-1] == "<0.001" for row in rows)
    unknown = gptlab(lab, "compare", "--metric", "tokens_per_sec")
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines()[-1].startswith(
        "error: --metric tokens_per_sec: no experiment has it (did you mean ")


def test_experiments_show_metrics_and_plots_diff_has_the_loss_curve(lab):
    chosen = next(e.name for e in read_experiments(lab).finished
                  if e.params.get("model.norm") == "rmsnorm")
    table = dvc(lab, "exp", "show", "--csv")
    header = table.splitlines()[0].split(",")
    assert "val_loss" in header and "model.norm" in header
    assert chosen in table
    diff = json.loads(dvc(lab, "plots", "diff", chosen, "--json"))
    curves = json.dumps(diff)
    assert "train_loss" in curves and "val_loss" in curves


def test_report_of_an_experiment_shows_its_own_results(lab, tmp_path):
    found = read_experiments(lab)
    chosen = next(e for e in found.finished if e.params.get("model.norm") == "rmsnorm")
    result = gptlab(lab, "report", "--exp", chosen.name, "-o", str(tmp_path / "card.md"))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "card.md").read_text()
    assert f"# Report: {chosen.name}" in text and f"commit `{chosen.rev[:12]}`" in text
    assert f"loss {chosen.metrics['val_loss']:.4f} nats per token" in text
    assert "rmsnorm" in text and f"seed {chosen.params['seed']}" in text
    assert (tmp_path / "card-loss.png").read_bytes().startswith(b"\x89PNG")


def test_scaling_fits_the_sweep_and_writes_its_summary_and_figure(lab):
    # The fewest resamples it takes, for time: the default's 200 take a minute here.
    result = gptlab(lab, "scaling", "--samples", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 runs: L(N, D) = ")
    assert "95% intervals from 40 resamples" in result.stdout
    summary = json.loads((lab / "metrics" / "scaling.json").read_text())
    assert summary["runs"] == 6 and summary["bootstrap"]["samples"] == 40
    assert set(summary["law"]) >= {"E", "A", "B", "alpha", "beta"}
    # Two isoFLOP profiles, each named by the budget its experiments were queued at.
    assert set(summary["isoflop"]["profiles"]) == {"38000000.0", "110000000.0"}
    assert all(profile["runs"] == 3 for profile in summary["isoflop"]["profiles"].values())
    assert "isoFLOP profiles" in result.stdout and "at 3.8e+07 FLOPs (3 runs)" in result.stdout
    # Six tiny runs cannot pin down a law: the output says so instead of advising a split.
    assert summary["warnings"] and summary["compute_optimal"]["reliable"] is False
    assert "no compute-optimal split" in result.stdout
    assert (lab / "plots" / "scaling.png").read_bytes().startswith(b"\x89PNG")


def test_scaling_with_a_failed_experiment_is_one_line(lab, tmp_path):
    project = copy_project(lab, tmp_path)
    # 15 is not divisible by the 2 heads: the train stage refuses it.
    dvc(project, "exp", "run", "--queue", "-n", "scale-broken", "-S", "model.n_embd=15")
    dvc_run(project, "exp", "run", "--run-all")
    result = gptlab(project, "scaling")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: experiment scale-broken of the sweep has no results: still queued or running, "
        "or failed (`dvc queue status`, `dvc queue logs scale-broken`); wait for it, or remove "
        "it with `dvc exp remove`"]
