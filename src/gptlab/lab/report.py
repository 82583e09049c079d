"""A run's report card: one Markdown page with what its stages recorded, for the workspace or for
one DVC experiment.

Environment, data, tokenizer, model, training, evaluation (with any downstream task scores), a
sample and the figures, all read from the metrics and outputs the stages wrote (and, for an
experiment, from its commit and DVC's cache): nothing is computed again, so the page says what
the run was, not what it would be now.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptlab.clean import LEAK_SHINGLE_WORDS
from gptlab.errors import GptlabError
from gptlab.io import atomic_path, write_text
from gptlab.lab.experiments import flatten
from gptlab.params import PARAMS_FILE, TASK_NAMES

METRICS = ("clean", "tokenize", "train", "eval", "sample")
FIGURES = ("loss.png", "lr.png", "throughput.png")
# A finished experiment's ref: refs/exps/<its baseline commit, split after two digits>/<name>.
# DVC keeps other refs there too: its queue's (celery/), and EXEC_*, ORIG_HEAD, stash.
EXPERIMENT_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38,62}/(?P<name>[^/]+)")


@dataclass(frozen=True)
class RunRecord:
    """What one run left behind."""

    name: str
    commit: str
    dirty: bool
    lock_sha256: str
    params: dict[str, Any]  # dotted keys
    metrics: dict[str, dict[str, Any]]  # by stage: "train" -> metrics/train.json
    training: dict[str, Any]  # models/config.json's training summary
    samples: str  # samples/samples.md
    figures: dict[str, bytes]  # plots/*.png by file name


def workspace_record(project: Path = Path(".")) -> RunRecord:
    """The run in the project's folders now."""
    def read(path: str) -> bytes:
        try:
            return (project / path).read_bytes()
        except FileNotFoundError:
            raise GptlabError(f"{project / path}: not found (run `dvc repro` first)") from None

    commit = git(project, "rev-parse", "HEAD").strip()
    dirty = bool(git(project, "status", "--porcelain", "--untracked-files=no").strip())
    return record("workspace", commit, dirty, read)


def experiment_record(name: str, project: Path = Path(".")) -> RunRecord:
    """The DVC experiment `name`, from its commit and DVC's cache."""
    rev = experiment_commit(name, project)

    def read(path: str) -> bytes:
        if path.startswith("models/"):  # a DVC output: in the cache, not in git
            import dvc.api
            from dvc.exceptions import DvcException

            try:
                return dvc.api.read(path, repo=str(project), rev=rev, mode="rb")
            except DvcException as error:
                raise GptlabError(f"{path} of experiment {name}: not in DVC's cache ({error}); "
                                  f"fetch it with `dvc exp pull <remote> {name}`") from None
        return git_bytes(project, "show", f"{rev}:{path}")

    return record(name, rev, False, read)


def experiment_commit(name: str, project: Path) -> str:
    """The commit of the finished experiment `name` (DVC keeps one ref per experiment, under
    refs/exps/<baseline commit>/<name>; queued and failed ones have none)."""
    refs = git(project, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    experiments: dict[str, list[str]] = {}
    for line in refs.splitlines():
        commit, ref = line.split(" ", 1)
        if experiment := EXPERIMENT_REF.fullmatch(ref):
            experiments.setdefault(experiment["name"], []).append(commit)
    commits = experiments.get(name, [])
    if not commits:
        known = ", ".join(sorted(experiments)) or "none"
        raise GptlabError(f"--exp: no finished experiment {name!r} (experiments: {known})")
    if len(commits) > 1:
        raise GptlabError(f"--exp: {len(commits)} experiments are named {name!r}, on different "
                          f"commits; rename one with `dvc exp rename`")
    return commits[0]


def record(name: str, commit: str, dirty: bool, read: Callable[[str], bytes]) -> RunRecord:
    lock = read("dvc.lock")
    metrics = {stage: json.loads(read(f"metrics/{stage}.json")) for stage in METRICS}
    return RunRecord(
        name, commit, dirty, hashlib.sha256(lock).hexdigest(), locked_params(lock), metrics,
        json.loads(read("models/config.json"))["training"], read("samples/samples.md").decode(),
        {figure: read(f"plots/{figure}") for figure in FIGURES})


def locked_params(lock: bytes) -> dict[str, Any]:
    """The params each stage ran with, as dvc.lock recorded them: params.yaml may have changed
    since, and the report describes the run."""
    stages = (yaml.safe_load(lock) or {}).get("stages") or {}
    params: dict[str, Any] = {}
    for stage in stages.values():
        params |= (stage.get("params") or {}).get(PARAMS_FILE) or {}
    return flatten(params)


def git(project: Path, *args: str) -> str:
    return git_bytes(project, *args).decode()


def git_bytes(project: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", *args], cwd=project, capture_output=True,
                              check=True).stdout
    except subprocess.CalledProcessError as error:
        raise GptlabError(f"git {' '.join(args)}: {error.stderr.decode().strip()}") from None


def render(run: RunRecord, figures_prefix: str) -> str:
    """The report's Markdown; figures are linked as `figures_prefix + file name`."""
    p, m, t = run.params, run.metrics, run.training
    # Runs from before gptlab could start from other weights or train adapters only.
    init = p.get("model.init", "scratch")
    trainable = m["train"].get("trainable_parameters", m["train"]["parameters"])
    tokens_per_step = p["train.batch_size"] * p["train.grad_accum"] * p["model.block_size"]
    lines = [
        f"# Report: {run.name}", "",
        "## Environment", "",
        f"- commit `{run.commit[:12]}`{' (with uncommitted changes)' if run.dirty else ''}, "
        f"dvc.lock sha256 `{run.lock_sha256[:12]}`",
        f"- Python {t.get('python_version', 'unknown')}, torch {t['torch_version']}, gptlab "
        f"{t['gptlab_version']}",
        f"- trained on {t['device']} ({t['processes']} process{'es' if t['processes'] > 1 else ''}"
        f", {t['dtype']})", "",
        "## Data", "",
        f"- source: {p['data.source']} `{p['data.spec']}`",
        f"- documents: {m['clean']['docs_in']} read, {m['clean']['docs_exact_duplicates']} exact "
        f"and {m['clean']['docs_near_duplicates']} near duplicates dropped, "
        f"{m['clean']['docs_kept']} kept ({m['clean']['train_docs']} train, "
        f"{m['clean']['val_docs']} validation)",
        f"- validation text also in train ({LEAK_SHINGLE_WORDS}-word shingles): "
        f"{m['clean']['leak_fraction']:.1%}",
        "",
        "## Tokenizer", "",
        f"- {p['tokenizer.kind']}, {m['tokenize']['vocab_size']:,} tokens, "
        f"{m['tokenize']['chars_per_token']} characters per token",
        f"- {m['tokenize']['train_tokens']:,} train and {m['tokenize']['val_tokens']:,} "
        f"validation tokens", "",
        "## Model", "",
        f"- {p['model.arch']}, {p['model.n_layer']} layers, {p['model.n_head']} heads, "
        f"{p['model.n_embd']} wide, block {p['model.block_size']}, {p['model.pos']} positions, "
        f"{p['model.norm']}, {p['model.mlp']}; started from {init}",
        f"- {m['train']['parameters']:,} parameters, {trainable:,} "
        f"trained", "",
        "## Training", "",
        f"- {t['step']:,} steps of {tokens_per_step:,} tokens: {t['step'] * tokens_per_step:,} "
        f"tokens, seed {p['seed']}",
        f"- {m['train']['wall_seconds']:,.0f} s, {m['train']['tokens_per_sec']:,.0f} tokens/s, "
        f"MFU {mfu(m['train'].get('mfu'))}",
        f"- final train loss {m['train']['final_train_loss']:.4f}, validation loss "
        f"{m['train']['final_val_loss']:.4f} (estimates)", "",
        "## Evaluation (every token of the validation split)", "",
        f"- loss {m['eval']['val_loss']:.4f} nats per token, perplexity "
        f"{m['eval']['perplexity']:.2f}, {m['eval']['bits_per_byte']:.3f} bits per byte", "",
        *downstream(m["eval"], p.get("eval.num_fewshot", 0)),
        "## A sample", "",
        *first_sample(run.samples), "",
        "## Figures", "",
        *(f"![{figure}]({figures_prefix}{figure})" for figure in FIGURES), "",
    ]
    return "\n".join(lines)


def downstream(metrics: dict[str, Any], num_fewshot: int) -> list[str]:
    """The section of the downstream task scores in metrics/eval.json, if the run has any."""
    lines = []
    for name in (name for name in TASK_NAMES if f"{name}_items" in metrics):
        scores = [f"{key} {metrics[f'{name}_{key}']:.4f}" for key in ("acc_norm", "acc")
                  if metrics.get(f"{name}_{key}") is not None]
        if metrics.get(f"{name}_perplexity") is not None:
            scores.append(f"perplexity {metrics[f'{name}_perplexity']:.2f}")
        skipped = metrics.get(f"{name}_skipped") or 0
        lines.append(f"- {name}: {', '.join(scores) or 'no item scored'} "
                     f"({metrics[f'{name}_items']:,} items"
                     f"{f', {skipped:,} the tokenizer cannot encode left out' if skipped else ''})")
    if not lines:
        return []
    return [f"## Downstream tasks ({num_fewshot}-shot, scored as lm-evaluation-harness does)",
            "", *lines, ""]


def mfu(value: float | None) -> str:
    return "n/a (no known peak for the device)" if value is None else f"{value:.1%}"


def first_sample(samples: str) -> list[str]:
    """The first code block of samples.md (the first prompt's first sample), fences included."""
    lines = samples.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("```")), None)
    fence = "" if start is None else lines[start].removesuffix("text")  # "```text" ... "```"
    end = None if start is None else next(
        (i for i in range(start + 1, len(lines)) if lines[i] == fence), None)
    if start is None or end is None:
        return ["(no complete sample in samples/samples.md)"]
    return lines[start : end + 1]


def write_report(run: RunRecord, out: Path) -> Path:
    """The report at `out`, its figures beside it as `<out stem>-<figure>`."""
    prefix = f"{out.stem}-"
    for figure, data in run.figures.items():
        with atomic_path(out.parent / f"{prefix}{figure}", "a figure") as tmp:
            tmp.write_bytes(data)
    write_text(out, render(run, prefix), "the report")
    return out
