"""Training: schedule, optimizer groups, batches, determinism, resume after a kill, and errors."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from helpers import (
    PROJECT_PARAMS,
    TIMINGS,
    assert_same_training,
    make_corpus,
    model_config,
    one_error_line,
    paths_in,
    run_params,
    run_stage,
    start_train,
    train_project,
    with_overrides,
    write_params,
    write_tokens,
)
from safetensors.torch import load_file

from gptlab.checkpoint import RESUME_FORMAT
from gptlab.distributed import World
from gptlab.errors import GptlabError
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import TrainParams, load_params
from gptlab.stop import StopRequest
from gptlab.tokenizers import CharTokenizer
from gptlab.train import LogInterval, train
from gptlab.trainlog import LOG_COLUMNS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokens_dir(char_tokens) -> Path:
    return char_tokens


def read_log(path: Path) -> list[dict[str, str]]:
    """The log's cells as written, text."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_writes_weights_log_and_metrics(tmp_path, tokens_dir):
    paths = paths_in(tmp_path, tokens_dir)
    metrics = train(run_params(), paths)
    # Numbers that compare across runs; what describes the run is in models/config.json.
    assert set(metrics) == {"final_train_loss", "final_val_loss", "best_val_loss",
                            "tokens_per_sec", "mfu", "peak_memory_mb", "parameters",
                            "trainable_parameters", "wall_seconds"}
    # Every weight trains; both counts leave out the position table, as nanoGPT counts.
    assert metrics["trainable_parameters"] == metrics["parameters"]
    assert all(isinstance(value, (int, float)) or value is None for value in metrics.values())
    assert metrics["mfu"] is None  # no known peak on CPU
    assert metrics["tokens_per_sec"] > 0
    assert metrics["best_val_loss"] <= metrics["final_val_loss"] + 1e-9
    rows = read_log(paths.log_csv)
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [0, 20, 40]
    assert all(int(r["tokens"]) == int(r["step"]) * 4 * 16 for r in rows)
    vocab = json.loads((tokens_dir / "tokenizer.json").read_text())["vocab_size"]
    assert float(rows[0]["val_loss"]) == pytest.approx(math.log(vocab), abs=0.3)
    assert metrics["final_val_loss"] < float(rows[0]["val_loss"]) - 0.3  # it learned
    assert sorted(p.name for p in paths.models_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((paths.models_dir / "config.json").read_text())
    assert config["model"]["n_embd"] == 32 and config["training"]["step"] == 40
    training = config["training"]
    assert training["dtype"] == "float32" and training["processes"] == 1
    assert training["device"] and training["torch_version"] == torch.__version__


def test_same_params_give_bit_identical_runs(tmp_path, tokens_dir):
    first = train(run_params(), paths_in(tmp_path / "a", tokens_dir))
    second = train(run_params(), paths_in(tmp_path / "b", tokens_dir))
    losses = ("final_train_loss", "final_val_loss", "best_val_loss")
    assert [first[k] for k in losses] == [second[k] for k in losses]
    weights_a = load_file(tmp_path / "a" / "models" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "models" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    log_a, log_b = read_log(tmp_path / "a" / "train_log.csv"), read_log(tmp_path / "b" /
                                                                        "train_log.csv")
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]


def test_bf16_autocast_and_gradient_accumulation_train(tmp_path, tokens_dir):
    params = run_params(train_overrides={"dtype": "bfloat16", "grad_accum": 2, "max_iters": 20})
    metrics = train(params, paths_in(tmp_path, tokens_dir))
    training = json.loads((tmp_path / "models" / "config.json").read_text())["training"]
    assert training["dtype"] == "bfloat16" and math.isfinite(metrics["final_val_loss"])
    rows = read_log(tmp_path / "train_log.csv")
    assert int(rows[-1]["tokens"]) == 20 * 4 * 2 * 16  # batch * accumulation * block


def test_a_diverging_run_stops_naming_the_step(tmp_path, tokens_dir):
    params = run_params(train_overrides={"lr": 1e30, "min_lr": 0.0, "warmup_iters": 0,
                                         "grad_clip": 0.0, "log_interval": 1})
    with pytest.raises(GptlabError, match=r"train: loss became (nan|inf) at step \d+"):
        train(params, paths_in(tmp_path, tokens_dir))


def test_block_size_longer_than_a_split_is_refused_before_training(tmp_path):
    tokens_dir = write_tokens(tmp_path, make_corpus(300))
    with pytest.raises(GptlabError, match=r"model\.block_size: 64 is not shorter than the val"):
        train(run_params(model={"block_size": 64}), paths_in(tmp_path, tokens_dir))
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, tokens_dir):
    with pytest.raises(GptlabError, match=r"train\.device: cuda"):
        train(run_params(train_overrides={"device": "cuda"}), paths_in(tmp_path, tokens_dir))


def test_tokens_from_another_tokenizer_are_refused(tmp_path, tokens_dir):
    other = tmp_path / "tokens"
    shutil.copytree(tokens_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = CharTokenizer("abc").fingerprint
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GptlabError, match="another tokenizer"):
        train(run_params(), paths_in(tmp_path, other))


# ---------------------------------------------------------------------------------------------
# resume: the stage killed after a checkpoint, run again, ends where an uninterrupted run does

def wait_for_checkpoint(project: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(project.glob(".gptlab/runs/*/step-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.005)


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT])
def test_stage_stopped_after_a_checkpoint_resumes_to_the_same_result(
    tmp_path, char_tokens, default_params, uninterrupted_train, stop_signal
):
    project = train_project(tmp_path / "interrupted", char_tokens, default_params)
    process = start_train(project)
    wait_for_checkpoint(project, process)
    os.kill(process.pid, stop_signal)
    _, stderr = process.communicate()
    if stop_signal == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # Ctrl-C: a checkpoint of the current step, then the exit of an interrupted command
        assert process.returncode == 130 and "saving a checkpoint" in stderr
        assert stderr.splitlines()[-1] == "interrupted"
    assert not (project / "metrics" / "train.json").exists()

    resumed = start_train(project)
    _, stderr = resumed.communicate()
    assert resumed.returncode == 0 and "resuming from step" in stderr
    assert_same_training(project, uninterrupted_train[0])


def test_stage_that_read_params_changed_under_it_publishes_nothing(
    tmp_path, char_tokens, default_params
):
    """The race DVC opens when it records a queued or --temp experiment beside a running
    stage: params.yaml holds the experiment's values for a moment, the stage reads them, and
    the workspace's come back. Forced here: read seed 8, then seed 7 is put back."""
    project = train_project(tmp_path, char_tokens, default_params)
    workspace = (project / "params.yaml").read_text()
    write_params(project, with_overrides(yaml.safe_load(workspace), {"seed": 8}))
    process = start_train(project)
    wait_for_checkpoint(project, process)
    (project / "params.yaml").write_text(workspace)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert stderr.splitlines()[-1].startswith("error: params.yaml: changed while this ran")
    assert not (project / "models").exists() and not (project / "metrics").exists()


@pytest.mark.slow
def test_stage_reports_bad_input_in_one_line(tmp_path, params_for):
    write_params(tmp_path, params_for({"model.n_head": 3}))
    result = run_stage("train", tmp_path)
    assert "model.n_embd: 128 is not divisible by model.n_head=3" in one_error_line(result)
    assert not (tmp_path / "models").exists()


def test_checkpoints_of_another_gptlab_are_not_used(tmp_path, tokens_dir, capsys):
    paths = paths_in(tmp_path, tokens_dir)
    first = train(run_params(), paths)
    capsys.readouterr()
    for state_json in paths.runs_dir.glob("*/step-*/state.json"):
        state_json.write_text(state_json.read_text().replace(f'"format": {RESUME_FORMAT}',
                                                             '"format": 1'))
        manifest = state_json.parent / "manifest.json"  # as the older gptlab would have written
        digests = json.loads(manifest.read_text())
        digests["state.json"] = hashlib.sha256(state_json.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(digests))
    again = train(run_params(), paths)
    err = capsys.readouterr().err
    assert "format 1, this gptlab reads" in err and "starting afresh" in err
    assert "resuming" not in err and "step 20: train loss" in err  # trained again
    assert again["final_val_loss"] == first["final_val_loss"]  # a full rerun, same result


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(tmp_path, tokens_dir):
    """torch.compile is an optimisation, not a different model: same losses within rounding."""
    overrides = {"max_iters": 6, "eval_interval": 6, "checkpoint_interval": 6, "log_interval": 3}
    eager = train(run_params(train_overrides=overrides), paths_in(tmp_path / "eager", tokens_dir))
    compiled = train(run_params(train_overrides={**overrides, "compile": True}),
                     paths_in(tmp_path / "compiled", tokens_dir))
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-3)
    weights = load_file(tmp_path / "compiled" / "models" / "model.safetensors")
    assert not any(name.startswith("_orig_mod") for name in weights)  # the plain module is saved


def test_rerunning_a_finished_run_resumes_its_end_and_reports_the_same(tmp_path, tokens_dir,
                                                                      capsys):
    paths = paths_in(tmp_path, tokens_dir)
    first = train(run_params(), paths)
    capsys.readouterr()
    again = train(run_params(), paths)  # DVC reruns the stage when only code or outputs changed
    err = capsys.readouterr().err
    assert "resuming from step 40" in err and "train loss" not in err  # nothing trained again
    assert again == first  # the metrics saved with the last checkpoint


@pytest.mark.parametrize("content", [None, "{broken", '{"train_tokens": 0}'])
def test_a_missing_or_damaged_meta_json_is_named(tmp_path, tokens_dir, content):
    broken = tmp_path / "tokens"
    shutil.copytree(tokens_dir, broken)
    meta = broken / "meta.json"
    meta.unlink()
    if content is not None:
        meta.write_text(content)
    with pytest.raises(GptlabError, match=rf"{re.escape(str(meta))}: "):
        train(run_params(), paths_in(tmp_path, broken))


def test_a_log_interval_waits_for_the_device_before_reading_the_clock(monkeypatch):
    synced = []
    monkeypatch.setattr("gptlab.train.synchronize", synced.append)
    # Resumed mid-interval: 3 steps, their summed loss and 2.5 s already behind it.
    interval = LogInterval(CPU)
    interval.load_state_dict({"steps": 3, "loss_sum": 6.0, "seconds": 2.5})
    interval.add(torch.tensor(2.0))
    mean_loss, steps, seconds = interval.close(World())
    assert (mean_loss, steps) == (2.0, 4) and seconds >= 2.5
    assert synced == [CPU]  # GPU work is billed to the interval it belongs to
    interval.pause()
    assert interval.steps == 0 and float(interval.loss_sum) == 0.0 and synced == [CPU, CPU]


def test_a_log_interval_saves_and_restores_itself_through_json():
    interval = LogInterval(CPU)
    for loss in (1.25, 0.5):
        interval.add(torch.tensor(loss))
    interval.pause()
    state = interval.state_dict()
    assert state == {"steps": 2, "loss_sum": 1.75, "seconds": interval.seconds}
    restored = LogInterval(CPU)
    restored.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint's state.json
    assert restored.state_dict() == state


# The modded-nanogpt speedrun's components: Muon's momentum must resume with the run.
SPEEDRUN = ({"pos": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True,
             "logit_softcap": 15.0, "proj_init": "zero", "tie_weights": False},
            {"optimizer": "muon", "schedule": "wsd"})


@pytest.mark.parametrize("recipe", [({}, {}), SPEEDRUN], ids=["default", "speedrun"])
def test_a_stop_request_ends_the_run_with_a_checkpoint_that_resumes_to_the_same_result(
        tmp_path, tokens_dir, monkeypatch, recipe):
    @contextlib.contextmanager
    def stop_requested_at_once() -> Iterator[StopRequest]:
        yield StopRequest(requested=True)

    paths = paths_in(tmp_path / "stopped", tokens_dir)
    with monkeypatch.context() as patch:
        patch.setattr("gptlab.train.sigint_as_stop_request", stop_requested_at_once)
        assert train(run_params(*recipe), paths) is None  # stopped: no metrics
    # After the first step, midway through a log interval.
    assert [path.name for path in paths.runs_dir.glob("*/step-*")] == ["step-00000001"]
    resumed = train(run_params(*recipe), paths)
    uninterrupted = train(run_params(*recipe), paths_in(tmp_path / "uninterrupted", tokens_dir))
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {
        k: v for k, v in uninterrupted.items() if k not in TIMINGS}
    assert [r["train_loss"] for r in read_log(paths.log_csv)] == [
        r["train_loss"] for r in read_log(tmp_path / "uninterrupted" / "train_log.csv")]
    for name in ("model.safetensors", "config.json"):
        assert ((tmp_path / "stopped" / "models" / name).read_bytes()
                == (tmp_path / "uninterrupted" / "models" / name).read_bytes()), name


def test_train_optimizer_names_an_optimizer_that_exists(tmp_path, params_for):
    """make_optimizer builds what train.optimizer names; params.yaml accepts only those."""
    model = build_model(model_config(vocab_size=8, n_layer=1, n_head=1, n_embd=8, block_size=4))
    for name in get_args(TrainParams.model_fields["optimizer"].annotation):
        t = PROJECT_PARAMS.train.model_copy(update={"optimizer": name})
        assert make_optimizer(model, t, torch.device("cpu")).param_groups
    path = write_params(tmp_path, params_for({"train.optimizer": "sgd"}))
    with pytest.raises(GptlabError, match=r"params\.yaml: train\.optimizer: Input should be "
                                          r"'adamw' or 'muon' \(got 'sgd'\)$"):
        load_params(path)
