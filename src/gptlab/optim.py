"""The optimizer and its schedule: AdamW that decays matrices only, and nanoGPT's learning rate
(linear warmup, then cosine decay to min_lr)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gptlab.params import TrainParams

# Devices with a fused AdamW kernel, which does the whole update in one pass (CPU and MPS have
# had one since torch 2.4 and 2.5).
FUSED_DEVICES = ("cuda", "cpu", "mps")
# The optimizers train.optimizer names (its Literal in gptlab.params lists the same).
OPTIMIZERS = {"adamw": torch.optim.AdamW}


def learning_rate(step: int, t: TrainParams) -> float:
    """nanoGPT's schedule for 0-based `step`: linear warmup, then cosine decay to min_lr."""
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= t.max_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: nn.Module, t: TrainParams, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices only: biases and norm gains are not pulled towards zero. It
    takes the fused kernel wherever there is one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return OPTIMIZERS[t.optimizer](groups, lr=t.lr, betas=(t.beta1, t.beta2),
                                   fused=device.type in FUSED_DEVICES)
