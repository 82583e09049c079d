"""A scaling sweep as DVC experiments, and its finished runs read back as (N, D, loss) for
gptlab.lab.scaling.

The sweep is Hoffmann et al.'s (2022) approach 2: isoFLOP profiles. At each of a few compute
budgets C, several model shapes (depth x width) each train for the steps that spend C = 6 N D,
so that the loss against N at fixed C is a valley whose bottom is that budget's best model.

N counts every parameter of the model, as Hoffmann et al. did (a tied token table once, as it
is also the output layer; an untied output layer as weights of its own), D the training tokens,
and the loss is the validation loss on every token of the split (metrics/eval.json). With N so
counted, a run's C = 6 N D falls 9-24% short (9-26% tied) of the FLOPs nanoGPT's estimate
counts for the default ladder (attention over the 64-token context, which weighs most in the
smallest shapes); the non-embedding count of Kaplan et al. (2020) leaves out the output layer
too.

Each run's warmup is at most a twentieth of its steps, so the shortest runs are not spent
warming up; its schedule's decay ends at its last step, as each run's schedule always does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptlab.errors import GptlabError
from gptlab.lab.experiments import Experiments, queue_experiment
from gptlab.lab.scaling import ScalingRun
from gptlab.params import ModelConfig, ModelParams, TrainParams, describe

PREFIX = "scale-"
# The sweep's metrics: the loss on every token of the validation split, and the tokenize
# stage's counts (vocabulary, for N; train split, for epochs) as metrics/tokenize.json holds
# them (an experiment's metrics prefix them with the stage).
LOSS = "eval.val_loss"
SPLIT_KEYS = ("vocab_size", "train_tokens")
VOCAB_SIZE, TRAIN_TOKENS = (f"tokenize.{key}" for key in SPLIT_KEYS)
TOKENIZE_METRICS = Path("metrics/tokenize.json")
# Every run of a sweep trains every weight from random ones (N and D count nothing else), with
# the vocabulary unpadded (N counts only the rows the model uses).
FROM_SCRATCH = {"model.init": "scratch", "train.lora.rank": 0, "model.pad_vocab": False}
WARMUP_SHARE = 20  # a run warms up for at most 1/20 of its steps
# An experiment's name: scale-<budget>-<layers>x<width>, e.g. scale-1.2e11-2x20.
NAME = re.compile(rf"^{PREFIX}(?P<budget>\d+(?:\.\d+)?(?:e\d+)?)-\d+x\d+$")


@dataclass(frozen=True)
class PlannedRun:
    """One experiment of the sweep: its name, budget, shape, N, the steps that spend it, and
    its warmup."""

    name: str
    budget: float
    n_layer: int
    n_embd: int
    n_params: int
    steps: int
    n_tokens: int
    warmup: int

    @property
    def overrides(self) -> dict[str, Any]:
        return {**FROM_SCRATCH, "model.n_layer": self.n_layer, "model.n_embd": self.n_embd,
                "train.max_iters": self.steps, "train.warmup_iters": self.warmup}


def isoflop_design(model: ModelParams, train: TrainParams, budgets: list[float],
                   shapes: list[str], per_budget: int, vocab_size: int) -> list[PlannedRun]:
    """The sweep's experiments, checked before any is queued: at each budget (smallest first),
    `per_budget` consecutive shapes of the ladder (sorted by N), sliding up it as the budget
    grows, each trained for the steps that spend the budget."""
    ladder = sorted((_shape_size(model, shape, vocab_size) for shape in shapes),
                    key=lambda size: size[2])
    if per_budget < 3 or per_budget > len(ladder):
        raise GptlabError(f"--per-budget: {per_budget} shapes at each budget needs 3 or more "
                          f"(a valley has a bottom and two sides) and at most the "
                          f"{len(ladder)} --shapes given")
    budgets = sorted(budgets)
    labels = [_budget_label(budget) for budget in budgets]
    if len(set(labels)) < len(labels) or any(budget <= 0 for budget in budgets):
        raise GptlabError(f"--budgets: {','.join(labels)}: expected distinct positive FLOPs")
    tokens_per_step = train.batch_size * train.grad_accum * model.block_size
    planned = []
    slide = len(ladder) - per_budget
    for index, (budget, label) in enumerate(zip(budgets, labels, strict=True)):
        first = round(index * slide / (len(budgets) - 1)) if len(budgets) > 1 else slide // 2
        for n_layer, n_embd, n_params in ladder[first:first + per_budget]:
            steps = round(budget / (6 * n_params * tokens_per_step))
            if steps < 1:
                raise GptlabError(f"--budgets: {label} FLOPs buy shape {n_layer}x{n_embd} "
                                  f"(N = {n_params}) less than one step of {tokens_per_step} "
                                  f"tokens; raise the budget")
            planned.append(PlannedRun(f"{PREFIX}{label}-{n_layer}x{n_embd}", budget, n_layer,
                                      n_embd, n_params, steps, steps * tokens_per_step,
                                      min(train.warmup_iters, steps // WARMUP_SHARE)))
    return planned


def _shape_size(model: ModelParams, shape: str, vocab_size: int) -> tuple[int, int, int]:
    """(n_layer, n_embd, N) of a shape written LAYERSxWIDTH, refused in one line if the model
    section cannot take it."""
    match = re.fullmatch(r"(\d+)x(\d+)", shape)
    if match is None:
        raise GptlabError(f"--shapes: {shape!r} is not LAYERSxWIDTH (e.g. 2x64)")
    n_layer, n_embd = int(match[1]), int(match[2])
    try:
        changed = ModelParams(**{**model.model_dump(), "n_layer": n_layer, "n_embd": n_embd,
                                 "pad_vocab": FROM_SCRATCH["model.pad_vocab"]})
    except ValidationError as error:
        raise GptlabError(f"--shapes: {shape}: {describe(error, ModelParams)}") from None
    params = {f"model.{key}": value for key, value in changed.model_dump().items()}
    return n_layer, n_embd, model_params(params, vocab_size)


def _budget_label(budget: float) -> str:
    """2e11 as "2e11" and 6.3e11 as "6.3e11": a budget as an experiment's name can hold it."""
    text = f"{budget:.2g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def repeated_data(planned: list[PlannedRun], train_tokens: int) -> list[str]:
    """One line for each run that reads the train split more than once."""
    return [f"{run.name} reads {run.n_tokens:,} tokens, {run.n_tokens / train_tokens:.1f} epochs "
            f"of the {train_tokens:,}-token train split: it repeats data"
            for run in planned if run.n_tokens > train_tokens]


def queue_sweep(planned: list[PlannedRun], project: Path = Path(".")) -> None:
    """Queue each experiment of the sweep (`dvc queue start` runs them)."""
    for run in planned:
        queue_experiment(run.name, run.overrides, project)


def scaling_runs(experiments: Experiments, prefix: str = PREFIX) -> list[ScalingRun]:
    """The experiments named `prefix...` as (N, D, validation loss), each with the budget its
    name gives (none for a sweep of another design) and its seed; one without results is a
    GptlabError, since a fit without it would not be the sweep's. Runs of one name from several
    commits (--all-commits) are told apart by their commit."""
    unfinished = [name for name in experiments.unfinished if name.startswith(prefix)]
    if unfinished:
        raise GptlabError(f"experiment {unfinished[0]} of the sweep has no results: still queued "
                          f"or running, or failed (`dvc queue status`, `dvc queue logs "
                          f"{unfinished[0]}`); wait for it, or remove it with `dvc exp remove`")
    finished = [e for e in experiments.finished if e.name.startswith(prefix)]
    if not finished:
        raise GptlabError(f"no experiments of the sweep ({prefix}*) in this commit; queue them "
                          f"with `gptlab scaling --queue` and run them with `dvc queue start` "
                          f"(or add --all-commits for earlier commits' sweeps)")
    names = [experiment.name for experiment in finished]
    runs = []
    for experiment in finished:
        metrics = experiment.metrics
        if LOSS not in metrics or VOCAB_SIZE not in metrics:
            raise GptlabError(f"experiment {experiment.name}: no {LOSS} or {VOCAB_SIZE} in its "
                              f"metrics (did its evaluate and tokenize stages run?)")
        try:
            n_params = model_params(experiment.params, metrics[VOCAB_SIZE])
            n_tokens = training_tokens(experiment.params)
        except (ValidationError, KeyError) as error:
            problem = (f"no {error.args[0]}" if isinstance(error, KeyError)
                       else describe(error, ModelParams))
            raise GptlabError(f"experiment {experiment.name}: params.yaml: {problem}") from None
        name = (experiment.name if names.count(experiment.name) == 1
                else f"{experiment.name}@{(experiment.base or experiment.rev)[:7]}")
        planned = NAME.match(experiment.name)
        runs.append(ScalingRun(name, n_params, n_tokens, metrics[LOSS],
                               budget=float(planned["budget"]) if planned else None,
                               seed=experiment.params.get("seed")))
    return runs


def workspace_split(path: Path = TOKENIZE_METRICS) -> tuple[int, int]:
    """The workspace's vocabulary size and train split in tokens, as its tokenize stage
    counted them: N depends on the one and the epochs of a run on the other."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        vocab_size, train_tokens = (int(metrics[key]) for key in SPLIT_KEYS)
    except (OSError, ValueError, KeyError, TypeError):
        raise GptlabError(f"{path}: no vocab_size and train_tokens; the sweep's model sizes "
                          f"depend on the vocabulary, so run the tokenize stage first "
                          f"(`dvc repro tokenize`)") from None
    return vocab_size, train_tokens


def train_split_tokens(experiments: Experiments, prefix: str = PREFIX) -> int | None:
    """The train split's size in tokens, as the sweep's tokenize stage counted it (None when
    its runs did not record it)."""
    counts = {e.metrics.get(TRAIN_TOKENS) for e in experiments.finished
              if e.name.startswith(prefix)}
    return counts.pop() if len(counts) == 1 and None not in counts else None


def model_params(params: dict[str, object], vocab_size: int) -> int:
    """N: every parameter of the model (its num_params with the tables), counted on a copy
    without storage (meta device)."""
    import torch  # the model's torch, only when counting: `gptlab --help` should not wait for it

    from gptlab.model import build_model

    model = {key.removeprefix("model."): value for key, value in params.items()
             if key.startswith("model.")}
    config = ModelConfig.of(ModelParams(**model), vocab_size)
    with torch.device("meta"):
        built = build_model(config)
    return built.num_params(non_embedding=False)


def training_tokens(params: dict[str, object]) -> int:
    """D: tokens per step (batch x accumulation x block) times steps."""
    keys = ("train.batch_size", "train.grad_accum", "model.block_size", "train.max_iters")
    tokens = 1
    for key in keys:
        tokens *= int(params[key])
    return tokens
