"""The optimizer and its schedule: warmup then cosine or warmup-stable-decay, weight decay on
matrices only, and Muon beside AdamW."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import PROJECT_PARAMS, model_config

from gptlab import optim
from gptlab.model import build_model
from gptlab.optim import learning_rate, make_optimizer, set_learning_rate


def test_learning_rate_warms_up_then_decays_to_min_lr():
    t = PROJECT_PARAMS.train.model_copy(update={"lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 10,
                                                "max_iters": 100, "schedule": "cosine"})
    rates = [learning_rate(step, t) for step in range(101)]
    assert rates[0] == pytest.approx(1e-3 / 11)
    assert rates[9] == pytest.approx(1e-3 * 10 / 11)
    assert rates[10] == pytest.approx(1e-3)  # peak at the end of warmup
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[55] == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert rates[100] == pytest.approx(1e-4)


def test_optimizer_decays_matrices_only():
    model = build_model(model_config(vocab_size=65, n_layer=2, n_head=2, n_embd=32,
                                     block_size=16, bias=True))
    adamw = PROJECT_PARAMS.train.model_copy(update={"optimizer": "adamw"})
    optimizer = make_optimizer(model, adamw, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == PROJECT_PARAMS.train.weight_decay
    assert no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}  # every parameter exactly once
    assert optimizer.defaults["fused"]  # one kernel for the whole update
    set_learning_rate(optimizer, 0.125)
    assert [group["lr"] for group in optimizer.param_groups] == [0.125, 0.125]


def test_wsd_warms_up_holds_the_peak_then_decays_to_zero_in_a_line():
    t = PROJECT_PARAMS.train.model_copy(update={
        "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 10, "max_iters": 100, "schedule": "wsd",
        "cooldown": 0.4})
    rates = [learning_rate(step, t) for step in range(101)]
    assert rates[0] == pytest.approx(1e-3 / 11)
    assert rates[10:60] == [1e-3] * 50  # stable: the peak held until the last 40 steps
    assert rates[80] == pytest.approx(1e-3 * 20 / 40)
    assert rates[99] == pytest.approx(1e-3 / 40)
    assert rates[100] == 0.0  # to zero, not min_lr
    decay = [b - a for a, b in itertools.pairwise(rates[60:])]
    assert decay == pytest.approx([-1e-3 / 40] * 40)  # a straight line


def test_wsd_cooldown_longer_than_the_run_after_warmup_caps_the_warmup():
    t = PROJECT_PARAMS.train.model_copy(update={
        "lr": 1.0, "warmup_iters": 8, "max_iters": 10, "schedule": "wsd", "cooldown": 1.0})
    rates = [learning_rate(step, t) for step in range(10)]
    assert rates == pytest.approx([min((s + 1) / 9, (10 - s) / 10) for s in range(10)])


def muon_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(model_config(vocab_size=65, n_layer=2, n_head=2, n_embd=32,
                                     block_size=16, bias=True, tie_weights=False))
    t = PROJECT_PARAMS.train.model_copy(update={"optimizer": "muon", "lr": 1e-3,
                                                "muon_lr": 0.02})
    return model, make_optimizer(model, t, torch.device("cpu"))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model, optimizer = muon_setup()
    adamw, muon = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert muon_names == {name for name, p in model.named_parameters()
                          if name.startswith("blocks.") and p.dim() == 2}
    assert len(muon_names) == 2 * 4  # qkv, out, up, down in each of the 2 blocks
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert {"tok_emb.weight", "lm_head.weight", "pos_emb.weight"} <= adamw_names
    assert adamw_names.isdisjoint(muon_names)
    assert adamw_names | muon_names == set(names.values())  # every parameter exactly once
    set_learning_rate(optimizer, 5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4, 5e-4, 0.01]


def test_a_muon_step_moves_each_matrix_by_an_orthogonalised_update():
    model, optimizer = muon_setup()
    matrix = model.blocks[0].mlp.down_proj.weight  # (32, 128): Muon's scale is 1 here
    before = matrix.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    weight_decay = PROJECT_PARAMS.train.weight_decay
    update = (matrix.detach() - before * (1 - 0.02 * weight_decay)) / 0.02
    singular_values = torch.linalg.svdvals(update)
    # Newton-Schulz pushes every singular value of the momentum towards 1 (to about 0.7-1.2),
    # whatever the gradient's spectrum: a random gradient's spread far wider.
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    raw = torch.linalg.svdvals(matrix.grad)
    assert raw.max() / raw.min() > 1.5


def test_muon_and_adamw_state_saves_and_loads_as_one_optimizers():
    torch.manual_seed(0)
    model, optimizer = muon_setup()
    twin, twin_optimizer = muon_setup()
    twin.load_state_dict(model.state_dict())
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    state = optimizer.state_dict()
    # One optimizer's layout: parameters numbered 0.. across both, as a checkpoint stores them.
    numbered = [index for group in state["param_groups"] for index in group["params"]]
    assert numbered == list(range(len(list(model.parameters()))))
    assert set(state["state"]) == set(numbered)
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(copy.deepcopy(state))  # as read from a checkpoint
    gradients = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for network, opt in ((model, optimizer), (twin, twin_optimizer)):
        for name, p in network.named_parameters():
            p.grad = gradients[name].clone()
        opt.step()
    for (name, ours), theirs in zip(model.state_dict().items(), twin.state_dict().values(),
                                    strict=True):
        assert torch.equal(ours, theirs), name


def test_where_bf16_is_native_our_muon_is_torchs(monkeypatch):
    monkeypatch.setattr(optim, "has_bf16", lambda device: True)
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 16) * 0.02)]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    optimizers = optim.Muon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    for _ in range(2):
        ours[0].grad = torch.randn_like(ours[0])
        theirs[0].grad = ours[0].grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(ours[0], theirs[0])


def test_our_muon_steps_as_torchs_does_but_in_float32(monkeypatch):
    """Where bf16 is emulated the Newton-Schulz steps run in float32; the update is torch's
    Muon's, to the precision of bf16 (in which torch's computes it)."""
    monkeypatch.setattr(optim, "has_bf16", lambda device: False)
    torch.manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(rows, columns) * 0.02)
                for rows, columns in ((96, 32), (32, 128), (64, 64))]
    copies = [torch.nn.Parameter(m.detach().clone()) for m in matrices]
    starts = [m.detach().clone() for m in matrices]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
                "adjust_lr_fn": "original"}
    ours, theirs = optim.Muon(matrices, **settings), torch.optim.Muon(copies, **settings)
    for _ in range(3):  # momentum builds up
        for mine, reference in zip(matrices, copies, strict=True):
            mine.grad = torch.randn_like(mine)
            reference.grad = mine.grad.clone()
        ours.step()
        theirs.step()
    for mine, reference, start in zip(matrices, copies, starts, strict=True):
        our_change, their_change = mine.detach() - start, reference.detach() - start
        assert 0 < (our_change - their_change).norm() < 0.03 * their_change.norm()
    assert set(ours.state_dict()["state"][0]) == set(theirs.state_dict()["state"][0])
