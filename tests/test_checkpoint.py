"""Tests of gptlab.checkpoint: resume state round-trips exactly and is refused when it is of
another format, and a run's key changes with everything its result depends on."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PROJECT_PARAMS, ROOT, model_config, run_params
from safetensors import safe_open
from torch import nn

from gptlab.checkpoint import (
    RESUME_FORMAT,
    DamagedCheckpoint,
    ResumeState,
    checkpoint_folders,
    code_fingerprint,
    device_rng_state,
    load_resume,
    newest_good_checkpoint,
    run_key,
    save_resume,
    set_device_rng_state,
    verify_checkpoint,
)
from gptlab.imports import gptlab_imports
from gptlab.model import build_model
from gptlab.optim import learning_rate, make_optimizer

CPU = torch.device("cpu")
VOCAB = 3


def assert_same_state_dict(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


# --- resume checkpoints ------------------------------------------------------------------------

# AdamW, whose state the tests read by name (Muon's resume is test_train's speedrun recipe).
TRAIN = PROJECT_PARAMS.train.model_copy(update={"optimizer": "adamw"})
# Dropout makes each step draw from torch's global RNG, so exact resume needs it restored too.
RESUME_CONFIG = model_config(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=8,
                             dropout=0.1)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (input, target) batches from a private generator, the same on every call."""
    generator = torch.Generator().manual_seed(42)
    windows = torch.randint(0, VOCAB, (count, 2, RESUME_CONFIG.block_size + 1),
                            generator=generator)
    return [(window[:, :-1], window[:, 1:]) for window in windows]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One step as the train loop takes it: scheduled lr, backward, clip, AdamW."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, TRAIN)
    inputs, targets = batch
    _, loss = model(inputs, targets)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trained_model(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(RESUME_CONFIG).train()
    optimizer = make_optimizer(model, TRAIN, CPU)
    for step, batch in enumerate(batches(steps)):
        train_step(model, optimizer, step, batch)
    return model, optimizer


def fresh_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(999)  # other weights and another RNG position than the saved run's
    model = build_model(RESUME_CONFIG).train()
    return model, make_optimizer(model, TRAIN, CPU)


def resume_state(step: int) -> ResumeState:
    batch_rng = np.random.Generator(np.random.PCG64(1337))
    batch_rng.integers(0, 1000, size=17)  # move it off its seed position
    return ResumeState(
        step=step,
        batch_rng=batch_rng.bit_generator.state,
        best_val_loss=1.8125,
        wall_seconds=12.75,
        log=[{"step": 0, "tokens": 0, "val_loss": 2.0},
             {"step": step, "tokens": step * 16, "train_loss": 1.9, "lr": 3e-5}],
        scaler={"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                "growth_interval": 2000, "_growth_tracker": 3},
        interval={"steps": 3, "loss_sum": 5.5, "seconds": 1.25},
        other_ranks=[{"batch_rng": batch_rng.bit_generator.state, "torch_rng": [1, 2, 3],
                      "interval": {"steps": 3, "loss_sum": 6.25, "seconds": 1.5}}],
    )


def test_each_process_resumes_its_own_log_interval():
    state = resume_state(step=3)
    assert state.rank_interval(0) == {"steps": 3, "loss_sum": 5.5, "seconds": 1.25}
    assert state.rank_interval(1) == {"steps": 3, "loss_sum": 6.25, "seconds": 1.5}


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: JSON keeps values, not the tuple/list distinction."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a["state"].keys() == state_b["state"].keys()
    for param_id, values in state_a["state"].items():
        assert values.keys() == state_b["state"][param_id].keys()
        for name, value in values.items():
            other = state_b["state"][param_id][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (param_id, name)
                assert value.dtype == other.dtype, (param_id, name)
            else:
                assert value == other, (param_id, name)
    assert plain(state_a["param_groups"]) == plain(state_b["param_groups"])


def test_resume_restores_model_optimizer_rng_and_state_exactly(tmp_path):
    model, optimizer = trained_model(steps=3)
    state = resume_state(step=3)
    folder = save_resume(tmp_path, model, optimizer, state, CPU)
    assert folder == tmp_path / "step-00000003"
    rng_at_save = torch.get_rng_state()  # the test's own copy, independent of the file
    expected_draw = torch.rand(5)

    restored_model, restored_optimizer = fresh_model()
    assert verify_checkpoint(folder) == 3
    restored = load_resume(folder, restored_model, restored_optimizer, CPU)

    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert torch.equal(torch.rand(5), expected_draw)
    assert restored == state
    assert_same_state_dict(model, restored_model)
    assert_same_optimizer_state(optimizer, restored_optimizer)
    step_count = restored_optimizer.state[restored_model.tok_emb.weight]["step"]
    assert float(step_count) == 3
    # Every tensor Adam keeps came back, not only the first one.
    for values in restored_optimizer.state.values():
        assert {"step", "exp_avg", "exp_avg_sq"} <= values.keys()
    # The batch sampler picks up where it stopped: its 128-bit state survives JSON.
    saved_rng, loaded_rng = np.random.Generator(np.random.PCG64()), np.random.Generator(
        np.random.PCG64())
    saved_rng.bit_generator.state = state.batch_rng
    loaded_rng.bit_generator.state = restored.batch_rng
    assert np.array_equal(saved_rng.integers(0, 2**62, 8), loaded_rng.integers(0, 2**62, 8))


def test_one_more_step_after_resume_is_bit_identical(tmp_path):
    model, optimizer = trained_model(steps=3)
    folder = save_resume(tmp_path, model, optimizer, resume_state(step=3), CPU)
    rng_at_save = torch.get_rng_state()

    restored_model, restored_optimizer = fresh_model()
    load_resume(folder, restored_model, restored_optimizer, CPU)
    # The restored run continues on the RNG that load_resume set; the original on the one it
    # had when it saved (the two are equal, as the test above shows).
    next_batch = batches(4)[3]
    train_step(restored_model, restored_optimizer, 3, next_batch)
    torch.set_rng_state(rng_at_save)
    train_step(model, optimizer, 3, next_batch)

    assert_same_state_dict(model, restored_model)
    assert_same_optimizer_state(optimizer, restored_optimizer)


def test_resume_checkpoint_is_only_safetensors_and_json(tmp_path):
    model, optimizer = trained_model(steps=1)
    folder = save_resume(tmp_path / "runs", model, optimizer, resume_state(step=1), CPU)

    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.safetensors", "state.json", "state.safetensors",
    ]
    for name in ("model.safetensors", "state.safetensors"):
        with safe_open(str(folder / name), framework="pt") as f:  # really safetensors
            assert list(f.keys())

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    # Strict JSON: no NaN or Infinity, which other tools cannot read.
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"),
                      parse_constant=reject)
    assert meta["format"] == RESUME_FORMAT
    assert meta["step"] == 1


def test_the_newest_two_checkpoints_are_kept(tmp_path):
    model, optimizer = trained_model(steps=2)
    (tmp_path / ".step-00000009.abc.tmp").mkdir()  # what a write killed midway leaves
    for step in (1, 2, 3):
        save_resume(tmp_path, model, optimizer, replace(resume_state(step=step),
                                                        wall_seconds=float(step)), CPU)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step-00000003", "step-00000002"]
    # The leftover is gone too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    restored = load_resume(checkpoint_folders(tmp_path)[0], *fresh_model(), CPU)
    assert (restored.step, restored.wall_seconds) == (3, 3.0)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
@pytest.mark.parametrize("name", ["model.safetensors", "state.safetensors", "state.json",
                                  "manifest.json"])
def test_damage_on_disk_is_found_before_use_and_the_older_checkpoint_is_good(tmp_path, name,
                                                                            damage):
    model, optimizer = trained_model(steps=2)
    older = save_resume(tmp_path, model, optimizer, resume_state(step=1), CPU)
    newer = save_resume(tmp_path, model, optimizer, resume_state(step=2), CPU)
    damage(newer / name)
    with pytest.raises(DamagedCheckpoint, match=re.escape(str(newer)) + ": damaged resume "
                                                "checkpoint"):
        verify_checkpoint(newer)
    good, damaged = newest_good_checkpoint(tmp_path)
    assert good == older and [error.folder for error in damaged] == [newer]
    for file in (older, newer):
        assert file.exists()  # finding damage changes nothing on disk


def test_with_no_good_checkpoint_there_is_none_to_resume(tmp_path):
    model, optimizer = trained_model(steps=1)
    only = save_resume(tmp_path, model, optimizer, resume_state(step=1), CPU)
    (only / "state.safetensors").unlink()
    assert newest_good_checkpoint(tmp_path)[0] is None
    assert newest_good_checkpoint(tmp_path / "no-such-run") == (None, [])


@pytest.mark.parametrize("format_number", [RESUME_FORMAT + 1, RESUME_FORMAT - 1, 0, None, "2"])
def test_a_checkpoint_of_another_format_is_not_used(format_number, tmp_path):
    """Written whole (its checksums agree), but by another gptlab: not used, like a damaged
    one, so the run falls back and never stumbles on it again."""
    model, optimizer = trained_model(steps=1)
    folder = save_resume(tmp_path, model, optimizer, resume_state(step=1), CPU)
    meta_path = folder / "state.json"
    meta = json.loads(meta_path.read_text())
    if format_number is None:
        del meta["format"]
    else:
        meta["format"] = format_number
    meta_path.write_text(json.dumps(meta))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["state.json"] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match=re.escape(str(folder)) + ".*format "):
        verify_checkpoint(folder)


# --- run identity ------------------------------------------------------------------------------


def test_run_key_changes_with_any_param_tokens_and_number_of_processes():
    base = run_params()
    assert run_key(base, {"a": 1}) == run_key(run_params(), {"a": 1})
    assert run_key(base, {"a": 1}) != run_key(base, {"a": 2})
    assert run_key(base, {}) != run_key(run_params(model={"n_layer": 3}), {})
    assert run_key(base, {}) != run_key(run_params(train_overrides={"lr": 2e-3}), {})
    assert run_key(base, {}) != run_key(run_params(seed=1), {})
    assert run_key(base, {}) != run_key(base, {}, world_size=2)


def test_the_training_code_is_what_the_train_stage_imports():
    files = {path.name for path in gptlab_imports(ROOT / "stages" / "train.py")}
    assert {"train.py", "model.py", "checkpoint.py", "trainlog.py"} <= files
    # Tools around the pipeline are not training code: editing them keeps a run resumable.
    assert not files & {"cli.py", "plots.py", "encode.py", "generate.py"}
    assert not any("bench" in path.parts for path in gptlab_imports(ROOT / "stages" / "train.py"))


def test_the_code_fingerprint_follows_every_imported_module(tmp_path):
    package = tmp_path / "gptlab"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("from gptlab.middle import x\n")
    (package / "middle.py").write_text("import gptlab.sub\nx = 1\n")
    (package / "sub" / "__init__.py").write_text("def f():\n    from gptlab import leaf\n")
    (package / "leaf.py").write_text("y = 2\n")
    (package / "unrelated.py").write_text("z = 3\n")
    # The package's __init__.py runs with any of its modules.
    found = gptlab_imports(package / "top.py", package)
    assert {p.relative_to(package).as_posix() for p in found} == {
        "__init__.py", "middle.py", "sub/__init__.py", "leaf.py"}
    before = code_fingerprint("gptlab.top", package)
    (package / "unrelated.py").write_text("z = 4\n")
    assert code_fingerprint("gptlab.top", package) == before
    (package / "leaf.py").write_text("y = 3\n")  # imported inside a function, two levels down
    assert code_fingerprint("gptlab.top", package) != before


# --- the training device's generator ---------------------------------------------------------


def test_only_the_training_devices_generator_is_saved_and_restored(monkeypatch):
    """A run resumed with fewer GPUs visible (CUDA_VISIBLE_DEVICES) must not need the others':
    only the training device's state is kept."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: asked.append(("get", device)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: asked.append(("set", device, state.tolist())))
    gpu = torch.device("cuda", 1)
    saved = device_rng_state(gpu)
    assert list(saved) == ["rng.cuda"] and asked == [("get", gpu)]
    set_device_rng_state(saved, gpu)
    assert asked[-1] == ("set", gpu, [7])
    assert device_rng_state(CPU) == {}


def test_the_mps_generator_is_saved_so_dropout_resumes_exactly(monkeypatch):
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([3, 1]))
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: restored.append(state.tolist()))
    saved = device_rng_state(torch.device("mps"))
    assert list(saved) == ["rng.mps"]
    set_device_rng_state(saved, torch.device("mps"))
    assert restored == [[3, 1]]
