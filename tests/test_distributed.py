"""Data-parallel training for real: the train stage under torchrun, 2 CPU processes, gloo."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    PROJECT_PARAMS,
    make_corpus,
    model_config,
    one_error_line,
    paths_in,
    run_params,
    run_stage,
    stage_command,
    with_overrides,
    write_params,
    write_tokens,
)
from safetensors.torch import load_file

from gptlab.batches import batch_seed
from gptlab.checkpoint import ResumeState, save_resume
from gptlab.distributed import (
    World,
    any_rank,
    device_for_rank,
    gather_to_all,
    mean_over_ranks,
    relaunch_under_torchrun,
    world_from_env,
)
from gptlab.errors import GptlabError
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.train import train

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


@pytest.mark.slow
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
    configs = {name: json.loads((folder / "models" / "config.json").read_text())["training"]
               for name, folder in (("one", single), ("two", two_processes))}
    assert configs["one"]["processes"] == 1 and configs["two"]["processes"] == 2
    assert metrics["two"]["final_val_loss"] == pytest.approx(metrics["one"]["final_val_loss"],
                                                             abs=0.05)


@pytest.mark.slow
def test_only_rank_zero_writes(two_processes):
    assert sorted(p.name for p in (two_processes / "models").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    # One run folder, its newest checkpoint (step 60) and the one before (step 50).
    states = sorted(two_processes.glob(".gptlab/runs/*/step-*/state.json"))
    assert [path.parent.name for path in states] == ["step-00000050", "step-00000060"]
    state = json.loads(states[-1].read_text())
    assert len(state["other_ranks"]) == 1  # rank 1's streams, gathered into rank 0's checkpoint


@pytest.mark.slow
def test_killed_ddp_run_resumes_to_the_uninterrupted_weights(tmp_path, tokens_dir, params_for,
                                                             two_processes):
    folder = project(tmp_path / "killed", tokens_dir, params_for, nproc=2)
    process = start_stage(folder)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".gptlab/runs/*/step-*")):
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


@pytest.mark.slow
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


@pytest.mark.parametrize(("device", "gpus", "problem"), [
    ("cuda", 1, "train.nproc: 2 processes, but this machine has 1 GPU(s)"),
    ("mps", 0, "train.nproc: 2 processes on mps, but data-parallel training needs CUDA"),
])
def test_a_world_the_machine_cannot_hold_is_refused_before_any_work(monkeypatch, device, gpus,
                                                                   problem):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(GptlabError, match=re.escape(problem)):
        relaunch_under_torchrun(2, torch.device(device), ["never", "started"])
    # Under torchrun (several machines), each process checks its own place on its machine;
    # on MPS even the first.
    with pytest.raises(GptlabError, match=r"train\.nproc"):
        device_for_rank(torch.device(device), World(rank=3, local_rank=1, size=4))
    if device == "mps":
        with pytest.raises(GptlabError, match=r"train\.nproc"):
            device_for_rank(torch.device(device), World(rank=0, local_rank=0, size=2))
    assert device_for_rank(torch.device("cpu"), World(rank=1, local_rank=1, size=2)).type == "cpu"


AGREE = """
import sys
from pathlib import Path
import torch
from gptlab.checkpoint import agree_on_checkpoint, newest_good_checkpoint
from gptlab.distributed import process_group, world_from_env
from gptlab.errors import run_main

def main():
    world = world_from_env()
    # Each process looks in a folder of its own, as on machines without shared storage.
    run_dir = Path(sys.argv[1]) / f"rank{world.rank}"
    with process_group(world, torch.device("cpu")):
        folder, _ = newest_good_checkpoint(run_dir)
        agree_on_checkpoint(folder, run_dir, world)
        print("agreed", folder.name if folder else None)

run_main(main)
"""


@pytest.mark.slow
def test_processes_that_find_different_checkpoints_stop_before_any_work(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(vocab_size=5, n_layer=1, n_head=1, n_embd=8, block_size=4))
    optimizer = make_optimizer(model, PROJECT_PARAMS.train, torch.device("cpu"))
    state = ResumeState(step=10, batch_rng={}, best_val_loss=None, wall_seconds=0.0)
    for rank in (0, 1):
        save_resume(tmp_path / f"rank{rank}", model, optimizer, state, torch.device("cpu"))
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), str(tmp_path)]
    same = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # (The two processes' lines may interleave.)
    assert same.returncode == 0, same.stderr
    assert same.stdout.count("agreed") == same.stdout.count("step-00000010") == 2
    # Rank 1's machine holds a later checkpoint than rank 0's.
    save_resume(tmp_path / "rank1", model, optimizer, replace(state, step=20),
                torch.device("cpu"))
    different = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert different.returncode != 0 and "agreed" not in different.stdout
    errors = [line for line in different.stderr.splitlines() if line.startswith("error: ")]
    # Each process stops with that line (torchrun may end the other before it prints it).
    assert errors and all(
        "process 1 finds resume checkpoint step-00000020, process 0 finds step-00000010; every "
        "process must see the same runs folder (run from shared storage)" in line
        for line in errors), different.stderr


def test_cuda_graphs_are_refused_for_the_processes_that_actually_run(tmp_path, char_tokens,
                                                                     monkeypatch):
    """params.yaml was checked against train.nproc; a torchrun started by hand may start fewer
    processes, each then accumulating over several micro-batches."""
    params = run_params(train_overrides={"compile": True, "compile_mode": "reduce-overhead",
                                         "grad_accum": 4, "nproc": 4})
    # Rank 0 of 2, as torchrun tells it: refused before it joins the others.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(GptlabError, match=r"train\.compile_mode: reduce-overhead replays CUDA "
                                          r"graphs, .* over the 2 micro-batches per process"):
        train(params, paths_in(tmp_path, char_tokens))
    assert not (tmp_path / "models").exists()
