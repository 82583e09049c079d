"""Low-rank adapters: only they train, the merged model is what the adapters computed, and a
LoRA fine-tune of an earlier run trains, resumes and runs through DVC like any run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    assert_same_training,
    change_params,
    copy_project,
    dvc,
    model_config,
    paths_in,
    ran_stages,
    run_params,
    start_train,
    train_project,
    with_overrides,
    write_params,
)
from safetensors.torch import load_file

from gptlab.lora import LoRALinear, adapter_state_dict, add_adapters, merged_state_dict
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import LoraParams
from gptlab.published import load_published
from gptlab.train import train

LORA = LoraParams(rank=4, alpha=8.0, dropout=0.0,
                  targets=["qkv_proj", "out_proj", "up_proj", "down_proj"])
CPU = torch.device("cpu")


def tiny_model(seed: int = 0, **fields) -> torch.nn.Module:
    """A base model to adapt: random projections, as a trained model's are (zero ones would
    pass no gradient to the adapters of the projections before them)."""
    torch.manual_seed(seed)
    return build_model(model_config(vocab_size=40, n_layer=2, n_head=2, n_embd=32,
                                    block_size=16, **{"proj_init": "scaled", **fields})).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_at_the_base_model_and_only_they_train():
    base, adapted = tiny_model(), tiny_model()
    add_adapters(adapted, LORA)
    with torch.no_grad():
        assert torch.equal(adapted(tokens())[0], base(tokens())[0])  # B = 0 at the start
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    assert sum(isinstance(m, LoRALinear) for m in adapted.modules()) == 2 * 4
    optimizer = make_optimizer(adapted, run_params(train_overrides={"optimizer": "adamw"}).train,
                               CPU)
    _, loss = adapted.train()(tokens(), tokens(2))
    loss.backward()
    optimizer.step()
    # Frozen weights get neither gradients nor optimizer state.
    assert all(p.grad is None for n, p in adapted.named_parameters() if n not in trainable)
    assert len(optimizer.state) == len(trainable)


def test_muon_trains_the_adapters_and_leaves_the_frozen_weights_alone():
    adapted = tiny_model()
    add_adapters(adapted, LORA)
    frozen = {name: p.detach().clone() for name, p in adapted.named_parameters()
              if not p.requires_grad}
    train = run_params(train_overrides={"optimizer": "muon"}).train
    adamw, muon = make_optimizer(adapted, train, CPU).optimizers
    # The adapters are the blocks' trainable matrices: Muon's; AdamW has nothing left to train.
    assert sum(len(group["params"]) for group in muon.param_groups) == 2 * 2 * 4
    assert not any(group["params"] for group in adamw.param_groups)
    _, loss = adapted.train()(tokens(), tokens(2))
    loss.backward()
    muon.step()
    for name, p in adapted.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        elif name.endswith("lora_b"):
            assert p.any(), name  # moved off its zero start


@pytest.mark.parametrize(("pos", "norm", "mlp"), [("learned", "layernorm", "gelu"),
                                                  ("rope", "rmsnorm", "swiglu")])
def test_the_merged_model_computes_what_the_adapted_one_does(pos, norm, mlp):
    adapted = tiny_model(pos=pos, norm=norm, mlp=mlp)
    add_adapters(adapted, LORA.model_copy(update={"targets": [
        "qkv_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]}))
    with torch.no_grad():
        for module in adapted.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.1)  # as if trained
    merged = tiny_model(seed=5, pos=pos, norm=norm, mlp=mlp)
    merged.load_state_dict(merged_state_dict(adapted))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens())[0], adapted(tokens())[0], atol=1e-5,
                                   rtol=1e-5)
    projections = [("attn", "qkv_proj"), ("attn", "out_proj"), ("mlp", "up_proj"),
                   ("mlp", "down_proj")] + ([("mlp", "gate_proj")] if mlp == "swiglu" else [])
    assert set(adapter_state_dict(adapted)) == {
        f"blocks.{i}.{owner}.{name}.lora_{ab}" for i in range(2) for ab in "ab"
        for owner, name in projections}  # a target the block does not have is skipped


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, char_tokens) -> Path:
    """An earlier run's models/ folder: what a fine-tune starts from."""
    folder = tmp_path_factory.mktemp("pretrained")
    train(run_params(), paths_in(folder, char_tokens))
    return folder / "models"


def test_a_lora_fine_tune_keeps_the_base_weights_and_publishes_them_merged(
        tmp_path, char_tokens, pretrained):
    params = run_params(model={"init": str(pretrained)},
                        train_overrides={"lora": LORA, "lr": 1e-2, "max_iters": 20})
    paths = paths_in(tmp_path, char_tokens)
    metrics = train(params, paths)
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 5
    base = load_published(pretrained).model.state_dict()
    (checkpoint,) = sorted(paths.runs_dir.glob("*/step-*"))[-1:]
    trained = load_file(checkpoint / "model.safetensors")
    for name, tensor in trained.items():  # the frozen weights, bit for bit the pretrained ones
        if not name.endswith(("lora_a", "lora_b")):
            assert torch.equal(tensor, base[name.replace(".base.", ".")]), name
    published = load_published(paths.models_dir)
    merged = published.model.state_dict()
    assert not torch.equal(merged["blocks.0.attn.qkv_proj.weight"],
                           base["blocks.0.attn.qkv_proj.weight"])  # the adapters learned
    assert torch.equal(merged["tok_emb.weight"], base["tok_emb.weight"])  # not adapted
    adapters = load_file(paths.models_dir / "adapters.safetensors")
    assert len(adapters) == 2 * 2 * 4  # lora_a and lora_b of 4 projections in 2 blocks
    summary = published.config.training
    assert summary["init"] == str(pretrained) and summary["lora"]["rank"] == 4


def test_starting_from_a_model_of_another_shape_names_the_key(tmp_path, char_tokens,
                                                              pretrained):
    params = run_params(model={"init": str(pretrained), "n_layer": 3})
    with pytest.raises(Exception, match=r"model\.n_layer: 3, but model\.init .* has 2; the "
                                        r"shape comes from the checkpoint"):
        train(params, paths_in(tmp_path, char_tokens))
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_a_lora_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
        tmp_path, char_tokens, default_params, pretrained):
    shape = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16}
    overrides = {**shape, "model.init": str(pretrained),
                 **{f"train.lora.{key}": value for key, value in LORA.model_dump().items()}}
    projects = []
    for name in ("reference", "killed"):
        project = train_project(tmp_path / name, char_tokens, default_params)
        params = yaml.safe_load((project / "params.yaml").read_text())
        write_params(project, with_overrides(params, overrides))
        projects.append(project)
    reference, killed = projects
    assert start_train(reference).wait() == 0
    process = start_train(killed)
    deadline = time.monotonic() + 120
    while not list(killed.glob(".gptlab/runs/*/step-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = start_train(killed)
    _, stderr = resumed.communicate()
    assert resumed.returncode == 0 and "resuming from step" in stderr
    assert_same_training(killed, reference)
    assert ((killed / "models" / "adapters.safetensors").read_bytes()
            == (reference / "models" / "adapters.safetensors").read_bytes())


def test_a_fine_tune_runs_through_dvc_repro(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    shutil.copytree(project / "models", project / "pretrained")  # an earlier run's model
    change_params(project, {"model.init": "pretrained", "train.lora.rank": 4,
                            "train.max_iters": 20})
    assert ran_stages(dvc(project, "repro")) == {"train", "evaluate", "sample", "plot"}
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["trainable_parameters"] < metrics["parameters"]
    assert (project / "models" / "adapters.safetensors").is_file()
    assert json.loads((project / "metrics" / "eval.json").read_text())["val_loss"] > 0
