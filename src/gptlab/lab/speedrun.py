"""The CPU speedrun's study as DVC experiments, and its records table.

A record counts as modded-nanogpt's do: a recipe reaches the target (nanoGPT's CPU recipe's
validation loss) when its mean over at least 5 seeds is below it with a one-sided p < 0.01.
The study runs each recipe of RECIPES at each seed as the experiment
`speedrun-<recipe>-<seed>`: the speedrun preset (data, split and scoring included) with the
recipe's changes, whatever the workspace's params.yaml holds. Reading the finished ones back
gives each recipe's mean loss with its interval, its test against the target, its difference
from the record's recipe (Welch's, as `gptlab compare`), and its training wall time (the median
of the train stage's `wall_seconds`, evaluations included).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gptlab.errors import GptlabError
from gptlab.lab.experiments import (
    Experiment,
    Experiments,
    flatten,
    queue_experiment,
    unflatten,
)
from gptlab.lab.stats import (
    Difference,
    below_target,
    difference,
    format_p,
    interval_json,
    summarize,
)
from gptlab.params import PARAMS_FILE, Params, describe

PREFIX = "speedrun-"
PRESET = Path(__file__).parents[1] / "presets" / "speedrun-cpu.yaml"
SEEDS = (1337, 1, 2, 3, 4)
MIN_SEEDS = 5  # the rule's "at least 5 seeds"
P_RECORD = 0.01  # the rule's one-sided p
P_EFFECT = 0.05  # a component's effect counts as measured below this two-sided p
# nanoGPT's CPU recipe (README's side by side): the mean of seeds 1337, 1 and 2 on every
# validation token in consecutive 64-token windows.
TARGET = 1.8991
LOSS = "eval.val_loss"
WALL = "train.wall_seconds"
NAME = re.compile(rf"^{PREFIX}(?P<recipe>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<seed>\d+)$")

RECORD, NANOGPT_RECIPE = "record", "nanogpt"
BASELINE, LEFT_OUT, ADDED = "baseline", "left out", "added"


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # RECORD (a row of the records ladder), BASELINE, LEFT_OUT (a component of the
    # record undone) or ADDED
    change: str  # what it changes in its base recipe, as the tables say it
    overrides: dict[str, Any]  # params on top of the preset
    base: str = RECORD  # the recipe its difference is measured against

    @property
    def label(self) -> str:
        return self.change or "the speedrun preset"


# nanoGPT's train_shakespeare_char recipe on CPU (the README's nanoGPT command), as the preset
# nanogpt-cpu.yaml has it.
NANOGPT = {"train.optimizer": "adamw", "train.lr": 1e-3, "train.schedule": "cosine",
           "train.batch_size": 12, "train.max_iters": 2000, "train.warmup_iters": 100,
           "train.eval_interval": 250, "train.checkpoint_interval": 250,
           "model.qk_norm": False, "model.proj_init": "scaled", "model.tie_weights": True}

RECIPES = (
    Recipe(RECORD, RECORD, "", {}),
    # The preset's loss exactly (evaluation draws batches of its own) in less time: its loss
    # curve evaluated 3 times on 10 batches instead of 7 times on 20.
    Recipe("fewer-evals", RECORD, "the preset, evaluated every 140 steps on 10 batches while it "
           "trains", {"train.eval_interval": 140, "train.eval_iters": 10}),
    Recipe(NANOGPT_RECIPE, BASELINE, "nanoGPT's recipe (AdamW 1e-3 on every weight, cosine, "
           "2000 steps of 12 sequences, tied output layer, GPT-2's init, no QK-norm)", NANOGPT),
    Recipe("no-muon", LEFT_OUT, "Muon (AdamW at 3e-3 on every weight)",
           {"train.optimizer": "adamw"}),
    Recipe("batch-12", LEFT_OUT, "32 sequences a step (12, the same 280 steps)",
           {"train.batch_size": 12}),
    # The two that change the time a step takes, again given at least the preset's wall time
    # (steps from their per-step times on a 2-core CPU): more steps for the time they save.
    Recipe("no-muon-time", LEFT_OUT, "Muon, in as much time or more (AdamW for 350 steps)",
           {"train.optimizer": "adamw", "train.max_iters": 350}),
    Recipe("batch-12-time", LEFT_OUT, "32 sequences a step, in as much time or more (12 for "
           "610 steps)", {"train.batch_size": 12, "train.max_iters": 610}),
    Recipe("no-qk-norm", LEFT_OUT, "QK-norm", {"model.qk_norm": False}),
    Recipe("tied", LEFT_OUT, "untied output layer (tied)", {"model.tie_weights": True}),
    Recipe("cosine", LEFT_OUT, "warmup-stable-decay (cosine to 1e-4)",
           {"train.schedule": "cosine"}),
    Recipe("scaled-init", LEFT_OUT, "zero projections (GPT-2's scaled init)",
           {"model.proj_init": "scaled"}),
    Recipe("relu2", ADDED, "ReLU² instead of GELU", {"model.mlp": "relu2"}),
    Recipe("softcap", ADDED, "logit soft-cap 30", {"model.logit_softcap": 30.0}),
    # Each component alone on top of nanoGPT's recipe, measured against it.
    Recipe("nanogpt-muon", ADDED, "Muon on the blocks' matrices (at 0.02)",
           {**NANOGPT, "train.optimizer": "muon"}, base=NANOGPT_RECIPE),
    Recipe("nanogpt-qk-norm", ADDED, "QK-norm", {**NANOGPT, "model.qk_norm": True},
           base=NANOGPT_RECIPE),
    Recipe("nanogpt-wsd", ADDED, "warmup-stable-decay (to zero over the last 40%)",
           {**NANOGPT, "train.schedule": "wsd"}, base=NANOGPT_RECIPE),
    Recipe("nanogpt-untied", ADDED, "an untied output layer",
           {**NANOGPT, "model.tie_weights": False}, base=NANOGPT_RECIPE),
    Recipe("nanogpt-zero-init", ADDED, "zero projections",
           {**NANOGPT, "model.proj_init": "zero"}, base=NANOGPT_RECIPE),
    # The two that change the time a step takes, at about nanoGPT's recipe's wall time: Muon
    # for fewer steps (its step's Newton-Schulz products cost about a third more here), 32
    # sequences a step for as many tokens.
    Recipe("nanogpt-muon-time", ADDED, "Muon, in about as much time (1400 steps)",
           {**NANOGPT, "train.optimizer": "muon", "train.max_iters": 1400}, base=NANOGPT_RECIPE),
    Recipe("nanogpt-batch-32-time", ADDED, "32 sequences a step, as many tokens (750 steps)",
           {**NANOGPT, "train.batch_size": 32, "train.max_iters": 750}, base=NANOGPT_RECIPE),
    Recipe("nanogpt-relu2", ADDED, "ReLU² instead of GELU", {**NANOGPT, "model.mlp": "relu2"},
           base=NANOGPT_RECIPE),
    Recipe("nanogpt-softcap", ADDED, "logit soft-cap 30",
           {**NANOGPT, "model.logit_softcap": 30.0}, base=NANOGPT_RECIPE),
)
BY_NAME = {recipe.name: recipe for recipe in RECIPES}


# --- queueing -----------------------------------------------------------------------------------

def choose_recipes(names: list[str] | None) -> list[Recipe]:
    if not names:
        return list(RECIPES)
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise GptlabError(f"--recipes: unknown {', '.join(unknown)} (known: "
                          f"{', '.join(BY_NAME)})")
    return [BY_NAME[name] for name in names]


def settings_of(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as params by dotted key, each value read as YAML."""
    settings = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise GptlabError(f"--set: {item!r} is not KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


@cache
def preset_params() -> dict[str, Any]:
    """The speedrun preset's params by dotted key."""
    return flatten(yaml.safe_load(PRESET.read_text(encoding="utf-8")))


def study_overrides(workspace: dict[str, Any], recipe: Recipe, seed: int,
                    settings: dict[str, Any]) -> dict[str, Any]:
    """The params (dotted keys) to set on the workspace's params.yaml for one run: where the
    preset differs from it, the recipe's changes, the seed, then `settings` (a local copy of
    the data, say); validated, so that a bad one stops the study before anything is queued."""
    preset = preset_params()
    unknown = sorted(set(settings) - set(preset))
    if unknown:
        raise GptlabError(f"--set: unknown key {unknown[0]!r}")
    try:
        valid = Params.model_validate(unflatten({**preset, **recipe.overrides, "seed": seed,
                                                 **settings}))
    except ValidationError as error:
        raise GptlabError(f"{PREFIX}{recipe.name}-{seed}: {describe(error)}") from None
    wanted = flatten(valid.model_dump(mode="json"))
    return {key: value for key, value in wanted.items() if workspace.get(key) != value}


def queue_study(recipes: list[Recipe], seeds: list[int], settings: dict[str, Any],
                project: Path = Path(".")) -> list[str]:
    """Queue each recipe at each seed (`dvc queue start` runs them); the names queued."""
    workspace = flatten(yaml.safe_load((project / PARAMS_FILE).read_text(encoding="utf-8")))
    planned = {f"{PREFIX}{recipe.name}-{seed}": study_overrides(workspace, recipe, seed, settings)
               for recipe in recipes for seed in seeds}
    for name, overrides in planned.items():
        queue_experiment(name, overrides, project)
    return list(planned)


# --- the records table --------------------------------------------------------------------------

def study_runs(experiments: Experiments) -> dict[str, list[Experiment]]:
    """The study's finished experiments by recipe, in RECIPES' order; an unfinished one, or a
    finished one without the loss or the wall time, is a GptlabError."""
    unfinished = [name for name in experiments.unfinished if NAME.match(name)]
    if unfinished:
        raise GptlabError(f"experiment {unfinished[0]} of the study has no results: still queued "
                          f"or running, or failed (`dvc queue status`, `dvc queue logs "
                          f"{unfinished[0]}`); wait for it, or remove it with `dvc exp remove`")
    runs: dict[str, list[Experiment]] = {}
    seen: dict[str, Experiment] = {}
    for experiment in experiments.finished:
        found = NAME.match(experiment.name)
        if found is None or found["recipe"] not in BY_NAME:
            continue
        if (earlier := seen.setdefault(experiment.name, experiment)) is not experiment:
            raise GptlabError(f"experiment {experiment.name} ran on two commits "
                              f"({(earlier.base or earlier.rev)[:7]}, "
                              f"{(experiment.base or experiment.rev)[:7]}): remove one with "
                              f"`dvc exp remove`, or leave out --all-commits")
        missing = [key for key in (LOSS, WALL) if key not in experiment.metrics]
        if missing:
            raise GptlabError(f"experiment {experiment.name}: no {missing[0]} in its metrics")
        runs.setdefault(found["recipe"], []).append(experiment)
    if RECORD not in runs:
        raise GptlabError(f"no finished experiments of the record's recipe ({PREFIX}{RECORD}-*) "
                          f"in this commit; queue the study with `gptlab speedrun --queue` and "
                          f"run it with `dvc queue start` (or add --all-commits for earlier "
                          f"commits' studies)")
    return {name: runs[name] for name in BY_NAME if name in runs}


def records(runs: dict[str, list[Experiment]], target: float = TARGET) -> dict[str, Any]:
    """The study as metrics/speedrun.json holds it: each recipe's loss over its seeds, its test
    against the target and its difference from the record's recipe, and its wall time."""
    summaries = {name: summarize([e.metrics[LOSS] for e in experiments])
                 for name, experiments in runs.items()}
    rows = []
    for name, experiments in runs.items():
        recipe = BY_NAME[name]
        losses = [e.metrics[LOSS] for e in experiments]
        walls = [e.metrics[WALL] for e in experiments]
        summary = summaries[name]
        base = summaries.get(recipe.base) if name != recipe.base else None
        versus_target = below_target(summary, target)
        params = experiments[0].params
        rows.append({
            "recipe": name, "kind": recipe.kind, "change": recipe.label,
            "steps": params["train.max_iters"], "batch_size": params["train.batch_size"],
            "seeds": [e.params["seed"] for e in experiments], "n": summary.n,
            "mean": summary.mean, "sd": summary.sd, "ci95": interval_json(summary.ci95),
            "min": min(losses), "max": max(losses),
            "p_below_target": versus_target.p_value,
            "reaches_target": _reaches(summary.n, versus_target.p_value),
            "wall_seconds": statistics.median(walls), "wall_range": [min(walls), max(walls)],
            "base": recipe.base,
            "vs_base": None if base is None else _difference(difference(summary, base)),
        })
    return {"target": target, "metric": LOSS,
            "rule": f"mean over at least {MIN_SEEDS} seeds below the target, one-sided "
                    f"p < {P_RECORD}", "recipes": rows}


def _reaches(n: int, p_value: float | None) -> bool:
    return n >= MIN_SEEDS and p_value is not None and p_value < P_RECORD


def _difference(diff: Difference) -> dict[str, Any]:
    return {"diff": diff.diff, "ci95": interval_json(diff.ci95), "p_value": diff.p_value}


# --- markdown -----------------------------------------------------------------------------------

def render_records(study: dict[str, Any]) -> str:
    """The records table (the baseline and the record's recipe) and the components tables
    (changes to the record's recipe, then to nanoGPT's), in markdown, as the README shows them."""
    rows = {row["recipe"]: row for row in study["recipes"]}
    baseline = rows.get(NANOGPT_RECIPE)
    lines = [f"| # | recipe | steps x sequences | training time | mean loss (seeds) | "
             f"p (below {study['target']}) |", "|---|---|---|---|---|---|"]
    steps = [row for row in study["recipes"] if row["kind"] == RECORD]
    ladder = steps if baseline is None else [baseline, *steps]
    for number, row in enumerate(ladder, 1):
        name = "nanoGPT's recipe" if row is baseline else row["change"]
        time = _seconds(row["wall_seconds"])
        if baseline is not None and row is not baseline:
            time += f" ({row['wall_seconds'] / baseline['wall_seconds']:.2f}x)"
        lines.append(f"| {number} | {name} | {row['steps']} x {row['batch_size']} | {time} | "
                     f"{row['mean']:.4f} ({row['n']}) | {format_p(row['p_below_target'])} |")
    for base, title in ((RECORD, "change to the preset"),
                        (NANOGPT_RECIPE, "change to nanoGPT's recipe")):
        lines += _components(study, base, title)
    return "\n".join(lines)


def _components(study: dict[str, Any], base: str, title: str) -> list[str]:
    """The table of the components measured against `base`, each with its verdict; none when
    the study has no such runs (or no runs of `base` to measure them against)."""
    rows = [row for row in study["recipes"]
            if row["kind"] in (LEFT_OUT, ADDED) and row["base"] == base and row["vs_base"]]
    if not rows:
        return []
    lines = ["", f"| {title} | mean loss (range) | difference (95% interval) | p | "
                 "training time | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        versus = row["vs_base"]
        change = f"{'without' if row['kind'] == LEFT_OUT else 'with'} {row['change']}"
        lines.append(f"| {change} | {row['mean']:.4f} ({row['min']:.4f}-{row['max']:.4f}) | "
                     f"{_signed(versus['diff'])} {_interval(versus['ci95'])} | "
                     f"{format_p(versus['p_value'])} | {_seconds(row['wall_seconds'])} | "
                     f"{_verdict(row)} |")
    return lines


def _verdict(row: dict[str, Any]) -> str:
    """Whether the component earns its place: a left-out component helps when leaving it out
    costs loss (p < P_EFFECT), an added one when adding it gains."""
    versus = row["vs_base"]
    if versus["p_value"] is None or versus["p_value"] >= P_EFFECT:
        return "no measurable effect"
    worse_without = versus["diff"] > 0
    if row["kind"] == LEFT_OUT:
        return "helps" if worse_without else "hurts"
    return "hurts" if worse_without else "helps"


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _interval(interval: list[float] | None) -> str:
    return "" if interval is None else f"({interval[0]:+.3f}, {interval[1]:+.3f})"
