"""The GPU speed ladder of `make bench`: GPT-2 124M training steps, one row per optimisation,
each row keeping all the ones above it, so the table shows what each buys.

Timings are printed, never asserted (see gptlab.bench).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptlab.device import autocast, device_name, peak_flops, synchronize
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import ModelConfig, TrainParams

# GPT-2 small (124M), the shape nanoGPT and llm.c report their speeds for, with GPT-2's true
# vocabulary: only the "padded vocab" row and those after it round it up to 50304. No biases,
# as in nanoGPT's speed runs: they cost time and do not help the loss.
GPT2_SHAPE = ModelConfig(arch="gpt", vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                         block_size=1024, dropout=0.0, bias=False, tie_weights=True,
                         pos="learned", norm="layernorm", mlp="gelu", pad_vocab=False)
# nanoGPT's AdamW settings for GPT-2, and its gradient clipping.
GPT2_OPTIMIZER = {"lr": 6e-4, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95}
GRAD_CLIP = 1.0
# Untimed steps before the clock starts: the first allocates AdamW's state and the caching
# allocator's blocks. A compiled model's first step compiles forward and backward; a couple more
# let its kernels' launch configurations and the allocator settle.
WARMUP = 3
COMPILE_WARMUP = 2

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """What a row of the ladder turns on."""

    tf32: bool = False  # TF32 tensor cores for float32 matmuls
    bf16: bool = False  # bf16 autocast (no loss scaling needed, unlike fp16)
    compile: bool = False  # torch.compile of the model
    flash: bool = False  # SDPA's flash-attention kernel instead of the math one
    pad_vocab: bool = False  # embedding and lm-head rows padded to a multiple of 64
    fused_adamw: bool = False  # AdamW's fused kernel instead of its multi-tensor (foreach) one


@dataclass(frozen=True)
class Rung:
    name: str
    settings: Settings


# One optimisation per row, in the order they are usually switched on.
RUNGS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("fp32", {}),
    ("+ TF32", {"tf32": True}),
    ("+ bf16 autocast", {"bf16": True}),
    ("+ torch.compile", {"compile": True}),
    ("+ flash attention", {"flash": True}),
    ("+ padded vocab", {"pad_vocab": True}),
    ("+ fused AdamW", {"fused_adamw": True}),
)


def ladder(compile: bool = True) -> list[Rung]:
    """The rows, each the previous row's settings plus one more. Without `compile` the
    torch.compile row is left out and no row compiles (compiling GPT-2 takes about a minute)."""
    rungs, settings = [], Settings()
    for name, change in RUNGS:
        if "compile" in change and not compile:
            continue
        settings = replace(settings, **change)
        rungs.append(Rung(name, settings))
    return rungs


@dataclass(frozen=True)
class LadderRow:
    name: str
    settings: Settings
    batch_size: int  # the largest micro-batch that fitted
    ms_per_step: float
    tokens_per_sec: float
    mfu: float | None  # against the device's bf16 peak; None where the peak is unknown


StepFn = Callable[[nn.Module, nn.Module, torch.optim.Optimizer, Tensor, Tensor, torch.dtype], None]


def train_step(model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
               inputs: Tensor, targets: Tensor, dtype: torch.dtype) -> None:
    """One optimizer step as training takes it (TrainingSession.optimizer_step with a single
    micro-batch, and no loss scaling: bf16 does not need it)."""
    with autocast(inputs.device, dtype):
        _, loss = forward(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def speed_ladder(device: torch.device, shape: ModelConfig = GPT2_SHAPE, steps: int = 10,
                 max_batch: int = 64, rows: list[Rung] | None = None, warmup: int = WARMUP,
                 step_fn: StepFn = train_step) -> list[LadderRow]:
    """Time `steps` training steps of `shape` for each row (default: the whole ladder)."""
    rungs = ladder() if rows is None else rows
    return [ladder_row(device, shape, rung, steps, max_batch, warmup, step_fn) for rung in rungs]


def ladder_row(device: torch.device, shape: ModelConfig, rung: Rung, steps: int, max_batch: int,
               warmup: int, step_fn: StepFn) -> LadderRow:
    """One row: the largest micro-batch that fits, and the speed at it."""
    config = shape.model_copy(update={"pad_vocab": rung.settings.pad_vocab})

    def attempt(batch_size: int) -> float:
        return seconds_per_step(device, config, rung.settings, batch_size, steps, warmup, step_fn)

    with rung_backends(rung.settings):
        batch_size, seconds = largest_fitting(attempt, max_batch)
    free_memory()  # the next row starts with the whole device
    tokens_per_sec = batch_size * config.block_size / seconds
    peak = peak_flops(device, torch.bfloat16)
    mfu = flops_per_token(config) * tokens_per_sec / peak if peak else None
    return LadderRow(rung.name, rung.settings, batch_size, seconds * 1000, tokens_per_sec, mfu)


def seconds_per_step(device: torch.device, config: ModelConfig, settings: Settings,
                     batch_size: int, steps: int, warmup: int, step_fn: StepFn) -> float:
    """Mean wall time of a training step of a fresh model on one random batch, after warmup.

    Running out of memory in any step, warmup or timed, is raised to the caller: from the
    second step on, weights, gradients, activations and AdamW's state are all held at once.
    """
    torch.manual_seed(0)
    if settings.compile:
        # A clean slate: no graphs of another row or batch size, no recompile limit reached.
        torch.compiler.reset()
    with torch.device(device):  # initialise the weights where they live: no copy from the CPU
        model = build_model(config)
    optimizer = ladder_optimizer(model, device, fused=settings.fused_adamw)
    # dynamic=False: each batch size gets its own static graph, as training would compile it.
    forward = torch.compile(model, dynamic=False) if settings.compile else model
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    # The same random batch every step: token ids do not change the speed of a step.
    tokens = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for _ in range(warmup + (COMPILE_WARMUP if settings.compile else 0)):
        step_fn(model, forward, optimizer, inputs, targets, dtype)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(model, forward, optimizer, inputs, targets, dtype)
    synchronize(device)  # kernels run asynchronously: wait for the last one before reading
    return (time.perf_counter() - start) / steps


def ladder_optimizer(model: nn.Module, device: torch.device, fused: bool) -> torch.optim.AdamW:
    """Training's AdamW (weight decay on matrices only), with or without the fused kernel."""
    # make_optimizer reads only the four GPT2_OPTIMIZER fields of its TrainParams;
    # model_construct skips validating the ones it ignores.
    return make_optimizer(model, TrainParams.model_construct(**GPT2_OPTIMIZER), device,
                          fused=fused)


def largest_fitting(attempt: Callable[[int], T], max_batch: int) -> tuple[int, T]:
    """attempt(batch) for batch = max_batch, max_batch // 2, ... 1: the first that does not run
    out of device memory, and its result. Running out at 1 is raised."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    batch = max_batch
    while True:
        try:
            return batch, attempt(batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # Outside the except block: the exception's frames, which hold the failed attempt's
        # tensors, are gone by now and their memory can be returned.
        free_memory()
        batch //= 2


@contextlib.contextmanager
def rung_backends(settings: Settings) -> Iterator[None]:
    """TF32 and the attention kernel as a row asks, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.tf32
    # Only the named kernel may run, so a row cannot silently measure another one.
    backend = SDPBackend.FLASH_ATTENTION if settings.flash else SDPBackend.MATH
    try:
        with sdpa_kernel(backend):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flops_per_token(config: ModelConfig) -> int:
    """The model's training FLOPs per token, counted on a copy without storage (meta device)."""
    with torch.device("meta"):
        return build_model(config).flops_per_token()


def free_memory() -> None:
    gc.collect()  # models and compiled graphs sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_gpu(steps: int = 10, max_batch: int = 64) -> None:
    """The speed ladder of GPT-2 124M training on this machine's GPU."""
    if not torch.cuda.is_available():
        print("\ngpu: skipped (no CUDA device)")
        return
    device = torch.device("cuda")
    s = GPT2_SHAPE
    peak = peak_flops(device, torch.bfloat16)
    print(f"\ngpu: {device_name(device)}, torch {torch.__version__}")
    print(f"  GPT-2 124M shape ({s.n_layer} layers, {s.n_head} heads, {s.n_embd} wide, block "
          f"{s.block_size}, vocab {s.vocab_size}, no biases); each row at the largest "
          f"micro-batch up to {max_batch} that fits, {steps} timed steps")
    peak_text = f"{peak / 1e12:,.0f} TFLOP/s" if peak else "unknown (not in device.PEAK_FLOPS)"
    print(f"  MFU of every row against this GPU's dense bf16 peak: {peak_text}")
    print(f"  {'':20s} {'batch':>5s} {'ms/step':>9s} {'tokens/s':>11s} {'MFU':>6s} {'vs prev':>7s}")
    previous = None
    for rung in ladder():
        row = ladder_row(device, s, rung, steps, max_batch, WARMUP, train_step)
        print(format_row(row, previous), flush=True)  # compiled rows take a minute each
        previous = row


def format_row(row: LadderRow, previous: LadderRow | None) -> str:
    mfu = f"{row.mfu:6.1%}" if row.mfu is not None else f"{'n/a':>6s}"
    gain = f"{row.tokens_per_sec / previous.tokens_per_sec:6.2f}x" if previous else ""
    return (f"  {row.name:20s} {row.batch_size:5d} {row.ms_per_step:9.1f} "
            f"{row.tokens_per_sec:11,.0f} {mfu} {gain:>7s}")
