"""gptlab.lab.sweep: the scaling sweep's grid, and its finished experiments as (N, D, loss)."""

from __future__ import annotations

import pytest
from helpers import PROJECT_PARAMS

from gptlab.errors import GptlabError
from gptlab.lab.experiments import Experiment, Experiments
from gptlab.lab.sweep import block_params, scaling_runs, sweep_grid, training_tokens

MODEL = {f"model.{key}": value for key, value in PROJECT_PARAMS.model.model_dump().items()}
TRAIN = {"train.batch_size": 12, "train.grad_accum": 2, "train.max_iters": 500}
METRICS = {"eval.val_loss": 2.1, "tokenize.vocab_size": 65}


def experiment(name: str, width: int = 64, steps: int = 500, **metrics: float) -> Experiment:
    params = {**MODEL, **TRAIN, "model.n_embd": width, "train.max_iters": steps}
    return Experiment(name, f"{name}-rev", params, {**METRICS, **metrics})


def test_the_grid_is_every_width_with_every_step_count():
    grid = sweep_grid(PROJECT_PARAMS.model, [32, 64], [100, 200, 400])
    assert [name for name, _ in grid] == [
        "scale-w32-s100", "scale-w32-s200", "scale-w32-s400",
        "scale-w64-s100", "scale-w64-s200", "scale-w64-s400"]
    # Every run trains every weight from random ones, whatever the workspace starts from.
    assert grid[4][1] == {"model.init": "scratch", "train.lora.rank": 0, "model.n_embd": 64,
                          "train.max_iters": 200}


@pytest.mark.parametrize(("widths", "steps", "message"), [
    ([30], [100], r"^--widths: 30: .*n_head"),  # 4 heads do not divide 30
    ([32], [0], r"^--steps: 0 is not a number of steps$"),
])
def test_a_bad_grid_is_refused_before_anything_is_queued(widths, steps, message):
    with pytest.raises(GptlabError, match=message):
        sweep_grid(PROJECT_PARAMS.model, widths, steps)


@pytest.mark.parametrize("changes", [
    {},
    {"model.tie_weights": False, "model.pos": "rope"},  # an output layer of its own, no table
    {"model.bias": True, "model.norm": "rmsnorm"},
])
def test_n_counts_the_blocks_and_final_norm_only(changes):
    params = {**MODEL, **changes, "model.n_layer": 3, "model.n_embd": 32}
    d, bias = 32, params["model.bias"]
    norm = d * (2 if bias and params["model.norm"] == "layernorm" else 1)
    # Attention: qkv (3 d^2) and output (d^2); the GELU MLP: up and down (4 d^2 each).
    linear = 12 * d * d + (3 * d + d + 4 * d + d if bias else 0)
    assert block_params(params, vocab_size=65) == 3 * (linear + 2 * norm) + norm


def test_d_is_tokens_per_step_times_steps():
    params = {**MODEL, **TRAIN}
    assert training_tokens(params) == 12 * 2 * MODEL["model.block_size"] * 500


def test_scaling_runs_are_the_sweeps_experiments_only():
    found = Experiments([experiment("scale-w32-s500", width=32), experiment("seed-2"),
                         experiment("scale-w64-s1000", width=64, steps=1000,
                                    **{"eval.val_loss": 1.8})],
                        [], {})
    runs = scaling_runs(found)
    assert [(run.name, run.loss) for run in runs] == [("scale-w32-s500", 2.1),
                                                      ("scale-w64-s1000", 1.8)]
    assert runs[1].n_tokens == 2 * runs[0].n_tokens
    assert runs[0].n_params == block_params(found.finished[0].params, 65)


def test_a_sweep_experiment_without_results_is_one_line():
    found = Experiments([experiment("scale-w32-s500")], ["seed-3", "scale-w64-s500"], {})
    with pytest.raises(GptlabError, match=r"^experiment scale-w64-s500 of the sweep has no "
                                          r"results: still queued or running, or failed"):
        scaling_runs(found)


def test_a_sweep_experiment_without_its_metrics_is_one_line():
    lacking = Experiment("scale-w32-s500", "rev", experiment("x").params,
                         {"eval.val_loss": 2.0})
    with pytest.raises(GptlabError, match=r"^experiment scale-w32-s500: no eval.val_loss or "
                                          r"tokenize.vocab_size"):
        scaling_runs(Experiments([lacking], [], {}))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.n_head", 5, r"params.yaml: .*n_head"),  # 5 heads do not divide 64
    ("train.batch_size", None, r"params.yaml: no train.batch_size$"),  # None: not there
])
def test_a_sweep_experiment_with_params_that_cannot_be_counted_is_one_line(key, value, message):
    params = {**experiment("x").params, key: value}
    if value is None:
        del params[key]
    odd = Experiment("scale-w64-s500", "rev", params, METRICS)
    with pytest.raises(GptlabError, match=r"^experiment scale-w64-s500: " + message):
        scaling_runs(Experiments([odd], [], {}))


def test_no_sweep_at_all_says_how_to_queue_one():
    with pytest.raises(GptlabError, match=r"gptlab scaling --queue"):
        scaling_runs(Experiments([experiment("seed-2")], [], {}))
