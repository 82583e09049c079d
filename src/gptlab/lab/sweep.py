"""A scaling sweep as DVC experiments: a grid of model widths and training lengths queued with
`dvc exp run --queue`, and the finished runs read back as (N, D, loss) for gptlab.lab.scaling.

N counts the parameters the blocks hold (no token or position tables, no output layer: what
Hoffmann et al. count), D the training tokens, and the loss is the validation loss on every
token of the split (metrics/eval.json).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from gptlab.errors import GptlabError
from gptlab.lab.experiments import Experiments
from gptlab.lab.scaling import ScalingRun
from gptlab.model import build_model
from gptlab.params import ModelConfig, ModelParams, describe

PREFIX = "scale-"
# Every run of a sweep trains every weight from random ones: N and D count nothing else.
# The sweep's metrics: the loss on every token of the validation split, and the vocabulary.
LOSS, VOCAB_SIZE = "eval.val_loss", "tokenize.vocab_size"
FROM_SCRATCH = {"model.init": "scratch", "train.lora.rank": 0}


def sweep_grid(model: ModelParams, widths: list[int],
               steps: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """The sweep's experiments, each a name and its params, checked before any is queued."""
    grid = []
    for width in widths:
        try:
            ModelParams(**{**model.model_dump(), "n_embd": width})
        except ValidationError as error:
            raise GptlabError(f"--widths: {width}: {describe(error, ModelParams)}") from None
        for count in steps:
            if count < 1:
                raise GptlabError(f"--steps: {count} is not a number of steps")
            grid.append((f"{PREFIX}w{width}-s{count}", {**FROM_SCRATCH, "model.n_embd": width,
                                                       "train.max_iters": count}))
    return grid


def queue_sweep(grid: list[tuple[str, dict[str, Any]]], project: Path = Path(".")) -> None:
    """Queue each experiment of the grid (`dvc queue start` runs them)."""
    for name, params in grid:
        settings = [item for key, value in params.items() for item in ("-S", f"{key}={value}")]
        command = [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, *settings]
        result = subprocess.run(command, cwd=project, capture_output=True, text=True)
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise GptlabError(f"queueing {name} failed: {last}")


def scaling_runs(experiments: Experiments, prefix: str = PREFIX) -> list[ScalingRun]:
    """The experiments named `prefix...` as (N, D, validation loss); one without results is
    a GptlabError, since a fit without it would not be the sweep's."""
    unfinished = [name for name in experiments.unfinished if name.startswith(prefix)]
    if unfinished:
        raise GptlabError(f"experiment {unfinished[0]} of the sweep has no results: still queued "
                          f"or running, or failed (`dvc queue status`, `dvc queue logs "
                          f"{unfinished[0]}`); wait for it, or remove it with `dvc exp remove`")
    runs = []
    for experiment in experiments.finished:
        if not experiment.name.startswith(prefix):
            continue
        metrics = experiment.metrics
        if LOSS not in metrics or VOCAB_SIZE not in metrics:
            raise GptlabError(f"experiment {experiment.name}: no {LOSS} or {VOCAB_SIZE} in its "
                              f"metrics (did its evaluate and tokenize stages run?)")
        try:
            n_params = block_params(experiment.params, metrics[VOCAB_SIZE])
            n_tokens = training_tokens(experiment.params)
        except (ValidationError, KeyError) as error:
            problem = (f"no {error.args[0]}" if isinstance(error, KeyError)
                       else describe(error, ModelParams))
            raise GptlabError(f"experiment {experiment.name}: params.yaml: {problem}") from None
        runs.append(ScalingRun(experiment.name, n_params, n_tokens, metrics[LOSS]))
    if not runs:
        raise GptlabError(f"no experiments of the sweep ({prefix}*) in this commit; queue them "
                          f"with `gptlab scaling --queue` and run them with `dvc queue start` "
                          f"(or add --all-commits for earlier commits' sweeps)")
    return runs


def block_params(params: dict[str, object], vocab_size: int) -> int:
    """N: the parameters of the model's blocks and final norm (GPT.block_params), counted on a
    copy without storage (meta device)."""
    model = {key.removeprefix("model."): value for key, value in params.items()
             if key.startswith("model.")}
    config = ModelConfig.of(ModelParams(**model), vocab_size)
    with torch.device("meta"):
        built = build_model(config)
    return built.block_params()


def training_tokens(params: dict[str, object]) -> int:
    """D: tokens per step (batch x accumulation x block) times steps."""
    keys = ("train.batch_size", "train.grad_accum", "model.block_size", "train.max_iters")
    tokens = 1
    for key in keys:
        tokens *= int(params[key])
    return tokens
