"""The GPU speed ladder of `make bench`: GPT-2 124M training steps, one row per optimisation,
each row keeping all the ones above it, so the table shows what each buys. Each step is
training's own (TrainingSession.optimizer_step) on windows of random tokens.

Timings are printed, never asserted (see gptlab.bench).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptlab.batches import RandomWindows
from gptlab.checkpoint import ResumeState
from gptlab.device import device_name, peak_flops, synchronize
from gptlab.distributed import World
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import ModelConfig, ModelParams, RunParams, TrainParams
from gptlab.train import LogInterval, TrainingSession, TrainPaths, training_forward

# GPT-2 small (124M), the shape nanoGPT and llm.c report their speeds for, with GPT-2's true
# vocabulary: only the "padded vocab" row and those after it round it up to 50304. No biases
# and the exact GELU, as in nanoGPT's speed runs: biases cost time and do not help the loss.
GPT2_SHAPE = ModelConfig.from_name("gpt2", bias=False, mlp="gelu", pad_vocab=False)
# nanoGPT's AdamW settings for GPT-2, and its gradient clipping.
GPT2_OPTIMIZER = {"optimizer": "adamw", "lr": 6e-4, "weight_decay": 0.1, "beta1": 0.9,
                  "beta2": 0.95, "grad_clip": 1.0}
# Random tokens the batches are drawn from, as training draws them from its token files: the
# ids do not change the speed of a step.
RANDOM_TOKENS = 1 << 20
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
    fused_adamw: bool = False  # AdamW's fused kernel (training's) instead of its foreach one


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


StepFn = Callable[[TrainingSession], object]


def training_step(session: TrainingSession) -> None:
    """One optimizer step, exactly as training takes it."""
    session.optimizer_step()


def speed_ladder(device: torch.device, train: TrainParams, shape: ModelConfig = GPT2_SHAPE,
                 steps: int = 10, max_batch: int = 64, rows: list[Rung] | None = None,
                 warmup: int = WARMUP, step_fn: StepFn = training_step) -> list[LadderRow]:
    """Time `steps` training steps of `shape` for each row (default: the whole ladder).
    `train` (params.yaml's train section) holds what the rows leave as training has it."""
    rungs = ladder() if rows is None else rows
    return [ladder_row(device, train, shape, rung, steps, max_batch, warmup, step_fn)
            for rung in rungs]


def ladder_row(device: torch.device, train: TrainParams, shape: ModelConfig, rung: Rung,
               steps: int, max_batch: int, warmup: int, step_fn: StepFn) -> LadderRow:
    """One row: the largest micro-batch that fits, and the speed at it."""
    config = shape.model_copy(update={"pad_vocab": rung.settings.pad_vocab})

    def attempt(batch_size: int) -> float:
        return seconds_per_step(device, config, rung.settings,
                                row_train_params(train, rung.settings, batch_size), steps,
                                warmup, step_fn)

    with rung_backends(rung.settings):
        batch_size, seconds = largest_fitting(attempt, max_batch)
    free_memory()  # the next row starts with the whole device
    tokens_per_sec = batch_size * config.block_size / seconds
    peak = peak_flops(device, torch.bfloat16)
    mfu = flops_per_token(config) * tokens_per_sec / peak if peak else None
    return LadderRow(rung.name, rung.settings, batch_size, seconds * 1000, tokens_per_sec, mfu)


def row_train_params(train: TrainParams, settings: Settings, batch_size: int) -> TrainParams:
    """`train` with nanoGPT's GPT-2 optimizer settings, one micro-batch of `batch_size` per
    step in one process, in the row's dtype, compiled (mode default) if the row compiles."""
    return train.model_copy(update={
        **GPT2_OPTIMIZER, "batch_size": batch_size, "grad_accum": 1, "nproc": 1,
        "dtype": "bfloat16" if settings.bf16 else "float32", "compile": settings.compile,
        "compile_mode": "default"})


def seconds_per_step(device: torch.device, config: ModelConfig, settings: Settings,
                     train: TrainParams, steps: int, warmup: int, step_fn: StepFn) -> float:
    """Mean wall time of a training step of a fresh model, after warmup.

    Running out of memory in any step, warmup or timed, is raised to the caller: from the
    second step on, weights, gradients, activations and AdamW's state are all held at once.
    """
    torch.manual_seed(0)
    if settings.compile:
        # A clean slate: no graphs of another row or batch size, no recompile limit reached.
        torch.compiler.reset()
    session = ladder_session(device, config, settings, train)
    for _ in range(warmup + (COMPILE_WARMUP if settings.compile else 0)):
        step_fn(session)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(session)
    synchronize(device)  # kernels run asynchronously: wait for the last one before reading
    return (time.perf_counter() - start) / steps


def ladder_session(device: torch.device, config: ModelConfig, settings: Settings,
                   train: TrainParams) -> TrainingSession:
    """A training session of a fresh model of `config`, set up as the row asks, on random
    tokens. Only its optimizer_step runs: it has no token files, logs or checkpoints."""
    with torch.device(device):  # initialise the weights where they live: no copy from the CPU
        model = build_model(config)
    optimizer = make_optimizer(model, train, device)
    if not settings.fused_adamw:
        optimizer = on_foreach_kernel(optimizer)
    tokens = np.random.default_rng(0).integers(config.vocab_size, size=RANDOM_TOKENS)
    batches = RandomWindows([tokens], config.block_size, train.batch_size, seed=0)
    world, nowhere = World(), Path(os.devnull)
    shape = ModelParams(**config.model_dump(exclude={"vocab_size"}), init="scratch")
    no_scaling = torch.amp.GradScaler(device.type, enabled=False)  # float32 and bf16 need none
    return TrainingSession(
        RunParams(0, shape, train), TrainPaths(nowhere, nowhere, nowhere, nowhere), world,
        device, dtype=torch.bfloat16 if settings.bf16 else torch.float32, meta={}, splits={},
        model=model, forward=training_forward(model, train, world, device),
        optimizer=optimizer, scaler=no_scaling, batches=batches, run_dir=nowhere,
        resumed=ResumeState(), interval=LogInterval(device))


def on_foreach_kernel(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """The same AdamW (its parameter groups, learning rate, betas and decay) on the
    multi-tensor foreach kernel, the one the fused kernel replaces."""
    groups = [{key: value for key, value in group.items() if key not in ("fused", "foreach")}
              for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, foreach=True)


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


def bench_gpu(train: TrainParams, steps: int = 10, max_batch: int = 64) -> None:
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
        row = ladder_row(device, train, s, rung, steps, max_batch, WARMUP, training_step)
        print(format_row(row, previous), flush=True)  # compiled rows take a minute each
        previous = row


def format_row(row: LadderRow, previous: LadderRow | None) -> str:
    mfu = f"{row.mfu:6.1%}" if row.mfu is not None else f"{'n/a':>6s}"
    gain = f"{row.tokens_per_sec / previous.tokens_per_sec:6.2f}x" if previous else ""
    return (f"  {row.name:20s} {row.batch_size:5d} {row.ms_per_step:9.1f} "
            f"{row.tokens_per_sec:11,.0f} {mfu} {gain:>7s}")
