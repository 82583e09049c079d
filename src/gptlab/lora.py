"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a large model by training small matrices.

A target projection y = W x becomes y = W x + (alpha / rank) B A x, with A (rank, in) and B
(out, rank): B starts at zero, so training starts from the model as it was, and W stays frozen,
so it needs neither gradients nor optimizer state: the memory of fine-tuning shrinks to the
activations and the adapters. What is published is the merged model, W + (alpha / rank) B A,
a plain GPT that evaluation, sampling and export load as any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.params import LoraParams

ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """A frozen Linear layer and its trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # As nn.Linear initialises its weight (the paper's choice for A); B = 0 makes the
        # adapted model start exactly where the base model is.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + self.scale * update

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


def add_adapters(model: nn.Module, lora: LoraParams) -> None:
    """Put adapters on the projections `lora.targets` names, in every block, and freeze every
    other parameter of the model."""
    model.requires_grad_(False)
    for block in model.blocks:
        for owner in (block.attn, block.mlp):
            for name in lora.targets:
                projection = getattr(owner, name, None)
                if isinstance(projection, nn.Linear):
                    setattr(owner, name, LoRALinear(projection, lora.rank, lora.alpha,
                                                    lora.dropout))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters alone, by the names of the projections they adapt."""
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
            if name.rsplit(".", 1)[-1] in ADAPTER_PARAMS}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model with every adapter merged into the weight it adapts:
    what `build_model` of the same config loads."""
    merged = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if leaf in ADAPTER_PARAMS:
            continue
        owner = model.get_submodule(module_name.removesuffix(".base"))
        if isinstance(owner, LoRALinear) and leaf == "weight":
            tensor = owner.merged_weight()
        merged[name.replace(".base.", ".")] = tensor
    return merged


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())
