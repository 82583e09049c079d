"""The optimizer and its schedule: AdamW that decays matrices only, or Muon on the blocks'
matrices beside it; nanoGPT's learning rate (linear warmup, then cosine decay to min_lr) or
warmup-stable-decay."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gptlab.device import has_bf16
from gptlab.params import TrainParams

# Devices with a fused AdamW kernel, which does the whole update in one pass (CPU and MPS have
# had one since torch 2.4 and 2.5).
FUSED_DEVICES = ("cuda", "cpu", "mps")


def learning_rate(step: int, t: TrainParams) -> float:
    """AdamW's learning rate for 0-based `step`: linear warmup, then train.schedule's decay."""
    if t.schedule == "wsd":
        return t.lr * min(warmup_fraction(step, t), wsd_fraction(step, t))
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= t.max_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def warmup_fraction(step: int, t: TrainParams) -> float:
    return (step + 1) / (t.warmup_iters + 1) if step < t.warmup_iters else 1.0


def wsd_fraction(step: int, t: TrainParams) -> float:
    """1 until the cooldown, then down in a straight line to 0 at max_iters (the last step
    still learns, at 1 / cooldown steps of the peak)."""
    cooldown_steps = max(1, round(t.cooldown * t.max_iters))
    return min(1.0, max(0.0, (t.max_iters - step) / cooldown_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer | Optimizers, lr: float) -> None:
    """Set AdamW's learning rate `lr`; a group with an lr_scale (Muon's) gets lr times it, so
    each group follows the schedule from its own peak."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model: nn.Module, t: TrainParams,
                   device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """train.optimizer for the model's trainable weights: AdamW alone, or Muon on the blocks'
    matrices with AdamW on the rest."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        return adamw([p for _, p in named], t, device)
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    rest = [p for name, p in named if not is_hidden_matrix(name, p)]
    # Muon's weight decay is decoupled and multiplied by its learning rate, as AdamW's is.
    muon = Muon([{"params": hidden, "lr_scale": t.muon_lr / t.lr}], lr=t.muon_lr,
                weight_decay=t.weight_decay, momentum=t.muon_momentum, nesterov=True,
                adjust_lr_fn="original")
    return Optimizers([adamw(rest, t, device), muon])


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A weight matrix inside a transformer block: what Muon updates. The embedding and output
    layer are lookups and a classifier, not maps between hidden states, and stay with AdamW."""
    return name.startswith("blocks.") and param.dim() == 2


def adamw(params: list[nn.Parameter], t: TrainParams, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices only: biases and norm gains are not pulled towards zero. It
    takes the fused kernel wherever there is one."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2),
                             fused=device.type in FUSED_DEVICES)


class Muon(torch.optim.Muon):
    """torch.optim.Muon, its Newton-Schulz steps in float32 where bf16 is not native: torch's
    runs them in bf16 always, which a CPU without AVX512-BF16 or AMX emulates at about 1% of its
    float32 speed (a step of the default model took 0.8 s instead of 0.05 s). The update, the
    state and the learning-rate scaling are torch's ("original": sqrt(max(1, rows / cols)))."""

    @torch.no_grad()
    def step(self) -> None:
        first = next((p for group in self.param_groups for p in group["params"]), None)
        if first is not None and has_bf16(first.device):
            super().step()
            return
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)  # torch's: the momentum buffers
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalised(update, group["ns_coefficients"], group["ns_steps"],
                                        group["eps"])
                rows, columns = param.shape
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / columns)))


def orthogonalised(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration in float32: roughly U V^T of the matrix's SVD
    (its singular values pushed to about 0.7-1.2 rather than exactly 1, which trains as well)."""
    a, b, c = coefficients
    wide = matrix.size(0) <= matrix.size(1)
    x = matrix.float() if wide else matrix.float().T
    x = x / x.norm().clamp(min=eps)  # the spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Optimizers:
    """Several optimizers, each over its own parameters, stepped as one: what the training
    loop, the gradient scaler and a checkpoint see is one optimizer's interface, and its state
    dict is one optimizer's layout (parameters numbered on across the optimizers), so a
    checkpoint holds it as it holds AdamW's."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            own = optimizer.state_dict()
            state.update({offset + index: values for index, values in own["state"].items()})
            groups += [{**group, "params": [offset + index for index in group["params"]]}
                       for group in own["param_groups"]]
            offset += sum(len(group["params"]) for group in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = iter(state_dict["param_groups"])
        offset = 0
        for optimizer in self.optimizers:
            own_groups = [next(groups) for _ in optimizer.param_groups]
            count = sum(len(group["params"]) for group in own_groups)
            own_state = {index - offset: values for index, values in state_dict["state"].items()
                         if offset <= index < offset + count}
            optimizer.load_state_dict({
                "state": own_state,
                "param_groups": [{**group, "params": [index - offset for index in group["params"]]}
                                 for group in own_groups]})
            offset += count
