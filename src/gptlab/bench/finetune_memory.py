"""Peak memory of a fine-tuning step of GPT-2 small's shape (random weights: the memory is the
same) at batch 1 and block 1024, every weight trained or LoRA adapters only.

    python -m gptlab.bench.finetune_memory RANK     # 0: every weight; else LoRA of that rank

A process of its own, started by gptlab.bench, so that its peak memory is the step's alone. It
prints the peak in MB and the number of trainable parameters.
"""

from __future__ import annotations

import sys

import torch

from gptlab.device import peak_memory_mb, pick_device
from gptlab.lora import add_adapters
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import LoraParams, ModelConfig, load_params

# The adapters `make bench` compares with training every weight.
ADAPTERS = {"alpha": 16.0, "dropout": 0.0, "targets": ["qkv_proj", "out_proj"]}


def main() -> None:
    rank = int(sys.argv[1])
    train = load_params().train
    device = pick_device("auto", "device")
    config = ModelConfig.from_name("gpt2")
    model = build_model(config).to(device)
    if rank:
        add_adapters(model, LoraParams(rank=rank, **ADAPTERS))
    optimizer = make_optimizer(model, train, device)
    tokens = torch.randint(0, config.vocab_size, (1, config.block_size + 1), device=device)
    for _ in range(2):  # the second step holds the optimizer's state too
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{peak_memory_mb(device):.0f} {trainable}")


if __name__ == "__main__":
    main()
