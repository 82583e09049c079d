"""The optimizer and its schedule: warmup then cosine decay, and weight decay on matrices only."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import PROJECT_PARAMS, model_config

from gptlab.model import build_model
from gptlab.optim import learning_rate, make_optimizer, set_learning_rate


def test_learning_rate_warms_up_then_decays_to_min_lr():
    t = PROJECT_PARAMS.train.model_copy(update={"lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 10,
                                                "max_iters": 100})
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
    optimizer = make_optimizer(model, PROJECT_PARAMS.train, torch.device("cpu"))
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
