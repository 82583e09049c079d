"""Data-parallel training for real: the train stage under torchrun, 2 CPU processes, gloo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    make_corpus,
    one_error_line,
    run_stage,
    stage_command,
    with_overrides,
    write_params,
    write_tokens,
)
from safetensors.torch import load_file

from gptlab.batches import batch_seed
from gptlab.distributed import World, any_rank, gather_to_all, mean_over_ranks, world_from_env

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
# grad_accum 2 over the whole run: two micro-batches in one process, or one in each of two.
TRAIN = {"device": "cpu", "dtype": "float32", "batch_size": 8, "grad_accum": 2, "max_iters": 60,
         "warmup_iters": 5, "eval_interval": 30, "eval_iters": 4, "log_interval": 5,
         "checkpoint_interval": 10}


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tokens"), make_corpus())


def project(folder: Path, tokens_dir: Path, params_for, nproc: int) -> Path:
    shutil.copytree(tokens_dir, folder / "data" / "tokens")
    write_params(folder, params_for({**{f"model.{k}": v for k, v in MODEL.items()},
                                     **{f"train.{k}": v for k, v in TRAIN.items()},
                                     "train.nproc": nproc}))
    return folder


def train_losses(folder: Path) -> list[float]:
    with open(folder / "plots" / "train_log.csv", newline="") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]]


def start_stage(folder: Path) -> subprocess.Popen:
    # A session of its own, so that a kill reaches torchrun and every process it started.
    return subprocess.Popen(stage_command("train"), cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_processes_in(folder: Path) -> None:
    """SIGKILL every process working in `folder`, as a crash of the whole machine would."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(os.readlink(f"/proc/{pid}/cwd")) == folder:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass  # gone already, or not ours


def trained(folder: Path, tokens_dir: Path, default_params, nproc: int) -> Path:
    """The train stage run to its end in `folder` with `nproc` processes; its output checked."""
    project(folder, tokens_dir, lambda o: with_overrides(default_params, o), nproc=nproc)
    result = run_stage("train", folder)
    assert result.returncode == 0, result.stderr
    assert ("--nproc_per_node=2" in result.stderr) == (nproc == 2)
    assert result.stdout.count("final_val_loss=") == 1  # rank 0 alone reports
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokens_dir, default_params) -> Path:
    return trained(tmp_path_factory.mktemp("single"), tokens_dir, default_params, nproc=1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tokens_dir, default_params) -> Path:
    return trained(tmp_path_factory.mktemp("ddp"), tokens_dir, default_params, nproc=2)


def test_two_processes_follow_the_single_process_loss_curve(single, two_processes):
    """Same global batch (2 x 8 sequences), different batches: the curves agree closely."""
    one, two = train_losses(single), train_losses(two_processes)
    assert len(one) == len(two) == TRAIN["max_iters"] // TRAIN["log_interval"]
    assert one != two  # each rank drew its own batches: not a copy of the single run
    assert one[0] - one[-1] > 0.5 and two[0] - two[-1] > 0.5  # both learned
    gaps = [abs(a - b) for a, b in zip(one, two, strict=True)]
    assert sum(gaps) / len(gaps) < 0.06 and max(gaps) < 0.15
    metrics = {name: json.loads((folder / "metrics" / "train.json").read_text())
               for name, folder in (("one", single), ("two", two_processes))}
    assert metrics["one"]["processes"] == 1 and metrics["two"]["processes"] == 2
    assert metrics["two"]["final_val_loss"] == pytest.approx(metrics["one"]["final_val_loss"],
                                                             abs=0.05)


def test_only_rank_zero_writes(two_processes):
    assert sorted(p.name for p in (two_processes / "models").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert len(list(two_processes.glob(".gptlab/runs/*/checkpoint/state.json"))) == 1
    state = json.loads(next(two_processes.glob(".gptlab/runs/*/checkpoint/state.json")).read_text())
    assert len(state["other_ranks"]) == 1  # rank 1's streams, gathered into rank 0's checkpoint


def test_killed_ddp_run_resumes_to_the_uninterrupted_weights(tmp_path, tokens_dir, params_for,
                                                             two_processes):
    folder = project(tmp_path / "killed", tokens_dir, params_for, nproc=2)
    process = start_stage(folder)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".gptlab/runs/*/checkpoint/state.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kill_processes_in(folder)  # torchrun starts its workers in sessions of their own
    assert not (folder / "metrics" / "train.json").exists()

    result = run_stage("train", folder)
    assert result.returncode == 0, result.stderr
    assert "resuming from step" in result.stderr
    resumed = load_file(folder / "models" / "model.safetensors")
    reference = load_file(two_processes / "models" / "model.safetensors")
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert train_losses(folder) == train_losses(two_processes)


def test_grad_accum_not_divisible_by_nproc_is_one_error_line(tmp_path, tokens_dir, params_for):
    folder = project(tmp_path, tokens_dir, params_for, nproc=2)
    write_params(folder, params_for({**{f"model.{k}": v for k, v in MODEL.items()},
                                     **{f"train.{k}": v for k, v in TRAIN.items()},
                                     "train.nproc": 2, "train.grad_accum": 3}))
    assert "train.grad_accum: 3 is not divisible by train.nproc=2" in one_error_line(
        run_stage("train", folder))


def test_a_world_of_one_needs_no_process_group():
    world = world_from_env() if "WORLD_SIZE" not in os.environ else World()
    assert world == World(rank=0, local_rank=0, size=1) and world.is_main
    value = torch.tensor(3.0)
    assert mean_over_ranks(value, world) is value
    assert any_rank(True, world, torch.device("cpu")) and not any_rank(False, world,
                                                                       torch.device("cpu"))
    assert gather_to_all({"a": 1}, world) == [{"a": 1}]


def test_rank_zero_keeps_the_single_process_batch_stream():
    assert batch_seed(1337, 0) == 1337
    assert batch_seed(1337, 1) != batch_seed(1337, 2)
