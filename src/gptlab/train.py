"""Training: AdamW with warmup and cosine decay, mixed precision, and checkpoints that resume
bit for bit.

Everything random (weights, dropout, batches) flows from `seed`, and all of it is saved with
each checkpoint, so a run killed at any point and started again ends exactly where an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gptlab import __version__
from gptlab.checkpoint import (
    IncompatibleCheckpoint,
    ResumeState,
    load_resume,
    save_published,
    save_resume,
)
from gptlab.device import (
    autocast,
    device_name,
    peak_flops,
    peak_memory_mb,
    pick_device,
    pick_dtype,
)
from gptlab.distributed import (
    World,
    any_rank,
    device_for_rank,
    gather_to_all,
    mean_over_ranks,
    process_group,
    world_from_env,
)
from gptlab.errors import GptlabError
from gptlab.io import atomic_path
from gptlab.model import GPTConfig, build_model
from gptlab.params import ModelParams, TrainParams
from gptlab.tokenizers import load_tokenizer
from gptlab.tokens import open_split, read_meta

LOG_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec")


@dataclass(frozen=True)
class TrainPaths:
    tokens_dir: Path = Path("data/tokens")
    models_dir: Path = Path("models")
    runs_dir: Path = Path(".gptlab/runs")
    log_csv: Path = Path("plots/train_log.csv")


class RandomWindows:
    """Random (input, target) windows of a split's token shards, from a generator whose state
    is saved.

    Every window lies inside one shard, and every window of every shard is equally likely: a
    start is drawn over all shards' windows at once, so with one shard the draws are exactly
    those of a single token file.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int,
                 seed: int | list[int]) -> None:
        self.shards = shards
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        windows = [max(0, len(shard) - block_size) for shard in shards]
        self._first_window = np.cumsum([0, *windows])

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, self._first_window[-1], size=self.batch_size)
        shard_of = np.searchsorted(self._first_window, starts, side="right") - 1
        rows = [self.shards[s][o : o + self.block_size + 1]
                for s, o in zip(shard_of, starts - self._first_window[shard_of], strict=True)]
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        if device.type == "cuda":
            # Pinned memory lets the copy overlap with the previous step's kernels.
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :-1], window[:, 1:]


def learning_rate(step: int, t: TrainParams) -> float:
    """nanoGPT's schedule for 0-based `step`: linear warmup, then cosine decay to min_lr."""
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= t.max_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: nn.Module, t: TrainParams, device: torch.device,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW that decays matrices only: biases and norm gains are not pulled towards zero.

    fused=None takes the fused kernel wherever there is one; False leaves the choice to torch
    (the multi-tensor foreach kernel on CUDA), which `make bench` compares it with.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        # The fused kernel does the whole update in one pass; CPU has one since torch 2.4.
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


@dataclass(frozen=True)
class RunParams:
    """The params sections a training run depends on."""

    seed: int
    model: ModelParams
    train: TrainParams


def run_key(params: RunParams, tokens_meta: dict[str, Any], world_size: int = 1) -> str:
    """Hash of everything a run's result depends on: a changed param, token file, number of
    processes or gptlab source file starts a fresh run (a checkpoint of other code must not be
    resumed)."""
    depends_on = {"seed": params.seed, "model": params.model.model_dump(),
                  "train": params.train.model_dump(), "tokens": tokens_meta,
                  "code": code_fingerprint(), "world_size": world_size}
    return hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the gptlab package's source files."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def batch_seed(seed: int, rank: int) -> int | list[int]:
    """Each process's own batch stream; rank 0 keeps the single-process stream, so a world of
    one trains exactly as before there were several."""
    return seed if rank == 0 else [seed, rank]


def train(params: RunParams, paths: TrainPaths = TrainPaths(),
          world: World | None = None) -> dict[str, Any]:
    """Train the model described by params on the token files; return the run's metrics.

    Under torchrun this is one process of a data-parallel run (see gptlab.distributed).
    """
    world = world or world_from_env()
    t = params.train
    if t.grad_accum % world.size:
        raise GptlabError(f"train.grad_accum: {t.grad_accum} is not divisible by the "
                          f"{world.size} processes of this run")
    device = device_for_rank(pick_device(t.device, "train.device"), world)
    with process_group(world, device):
        return _train(params, paths, world, device)


def _train(params: RunParams, paths: TrainPaths, world: World,
           device: torch.device) -> dict[str, Any]:
    t = params.train
    dtype = pick_dtype(t.dtype, device, "train.dtype")
    tokenizer = load_tokenizer(paths.tokens_dir / "tokenizer.json")
    meta = read_meta(paths.tokens_dir, [f"{split}_{key}" for split in ("train", "val")
                                        for key in ("tokens", "shards")])
    splits = {name: open_split(paths.tokens_dir, name, tokenizer, meta)
              for name in ("train", "val")}
    for name, shards in splits.items():
        longest = max(len(shard) for shard in shards)
        if longest <= params.model.block_size:
            raise GptlabError(f"model.block_size: {params.model.block_size} is not shorter than "
                              f"the {name} split's longest shard ({longest} tokens); lower it "
                              f"or add data")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(params.seed)  # the same initial weights in every process
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **params.model.model_dump())
    model = build_model(config).to(device)
    if world.rank > 0:
        torch.manual_seed(params.seed + world.rank)  # but dropout masks of its own
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = RandomWindows(splits["train"], config.block_size, t.batch_size,
                            batch_seed(params.seed, world.rank))

    run_dir = paths.runs_dir / run_key(params, meta, world.size)
    checkpoint_dir = run_dir / "checkpoint"
    state = ResumeState(step=0, batch_rng=batches.rng.bit_generator.state, best_val_loss=None,
                        wall_seconds=0.0)
    if (checkpoint_dir / "state.json").exists():
        try:
            state = load_resume(checkpoint_dir, model, optimizer)
        except IncompatibleCheckpoint as error:
            if world.is_main:
                print(f"ignoring {error}; starting afresh", file=sys.stderr)
        else:
            restore_rank_state(state, world, batches, device)
            if state.scaler:
                scaler.load_state_dict(state.scaler)
            if world.is_main:
                print(f"resuming from step {state.step} ({checkpoint_dir})", file=sys.stderr)
    forward: nn.Module = model
    if t.compile:
        forward = torch.compile(model, mode=t.compile_mode)
    if world.distributed:
        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    session = TrainingSession(params, model, forward, optimizer, scaler, batches, splits,
                              device, dtype, state, paths, checkpoint_dir, world)
    with sigint_as_stop_request() as stop:
        session.run(stop)
    return session.metrics(tokenizer_kind=tokenizer.kind)


def rank_state(batches: RandomWindows, device: torch.device,
               interval_loss_sum: float) -> dict[str, Any]:
    """What a process other than rank 0 needs to continue its own streams after a resume."""
    state = {"batch_rng": batches.rng.bit_generator.state,
             "torch_rng": torch.get_rng_state().tolist(),
             "interval_loss_sum": interval_loss_sum}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rank_state(state: ResumeState, world: World, batches: RandomWindows,
                       device: torch.device) -> None:
    """Put this process's streams where the checkpoint left them (rank 0's are in `state`
    itself and already restored by load_resume)."""
    if world.rank == 0:
        batches.rng.bit_generator.state = state.batch_rng
        return
    if len(state.other_ranks) != world.size - 1:
        raise GptlabError(f"resume checkpoint of {len(state.other_ranks) + 1} processes, this "
                          f"run has {world.size}; delete .gptlab/runs to start afresh")
    mine = state.other_ranks[world.rank - 1]
    batches.rng.bit_generator.state = mine["batch_rng"]
    state.interval_loss_sum = mine["interval_loss_sum"]
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    if "cuda_rng" in mine:
        torch.cuda.set_rng_state(torch.tensor(mine["cuda_rng"], dtype=torch.uint8), device)


class TrainingSession:
    """One process's share of a run: the loop, its evaluations, logs and checkpoints."""

    def __init__(self, params: RunParams, model: nn.Module, forward: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 batches: RandomWindows, splits: dict[str, list[np.ndarray]], device: torch.device,
                 dtype: torch.dtype, state: ResumeState, paths: TrainPaths,
                 checkpoint_dir: Path, world: World) -> None:
        self.params, self.t = params, params.train
        self.model, self.forward = model, forward
        self.optimizer, self.scaler, self.batches = optimizer, scaler, batches
        self.splits, self.device, self.dtype = splits, device, dtype
        self.state, self.paths, self.checkpoint_dir = state, paths, checkpoint_dir
        self.world = world
        self.micro_batches = self.t.grad_accum // world.size
        self.tokens_per_step = self.t.batch_size * self.t.grad_accum * params.model.block_size
        self.last_eval: dict[str, float] = {}
        self._started = time.perf_counter()

    def run(self, stop: StopRequest) -> None:
        t, state = self.t, self.state
        if state.step == 0:
            self.evaluate_and_log(0)
        progress = tqdm(total=t.max_iters, initial=state.step, unit="step",
                        disable=None if self.world.is_main else True, file=sys.stderr,
                        desc="train")
        # The log interval's running loss survives a checkpoint, so a resumed run logs the
        # same means; only step time is clocked, not evaluations and checkpoints.
        loss_sum = torch.tensor(state.interval_loss_sum, device=self.device)
        clock, step_seconds = time.perf_counter(), 0.0
        while state.step < t.max_iters:
            step = state.step + 1
            lr = learning_rate(step - 1, t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = self.optimizer_step()
            loss_sum += loss
            state.step, state.interval_steps = step, state.interval_steps + 1
            progress.update(1)
            at_log = step % t.log_interval == 0 or step == t.max_iters
            if at_log:
                # One host sync per interval; under DDP also the one exchange of losses and of
                # stop requests, so that every process stops at the same step.
                mean_loss = (mean_over_ranks(loss_sum, self.world) / state.interval_steps).item()
                step_seconds += time.perf_counter() - clock
                self.check_finite(mean_loss, step)
                rate = state.interval_steps * self.tokens_per_step / step_seconds
                self.log(step, train_loss=mean_loss, lr=lr, grad_norm=float(grad_norm),
                         tokens_per_sec=rate)
                progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{rate:,.0f}")
                loss_sum.zero_()
                state.interval_steps, step_seconds, clock = 0, 0.0, time.perf_counter()
            stopping = ((at_log or not self.world.distributed)
                        and any_rank(stop.requested, self.world, self.device))
            evaluate = step % t.eval_interval == 0 or step == t.max_iters
            checkpoint = step % t.checkpoint_interval == 0 or step == t.max_iters or stopping
            if evaluate or checkpoint:
                step_seconds += time.perf_counter() - clock
                if evaluate:
                    self.evaluate_and_log(step)
                if checkpoint:
                    state.interval_loss_sum = loss_sum.item()
                    self.save_checkpoint()
                if stopping:
                    progress.close()
                    raise KeyboardInterrupt
                clock = time.perf_counter()
        progress.close()
        if not self.last_eval:  # resumed a run that had already finished: score it again
            self.last_eval = self.evaluate()

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate gradients over micro-batches, clip, and update; return loss and norm."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.micro_batches):
            inputs, targets = self.batches.next(self.device)
            # DDP averages gradients over processes once, after the last micro-batch.
            last = micro == self.micro_batches - 1
            with self.gradient_sync(last):
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(inputs, targets)
                loss = loss / self.micro_batches
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        # With clipping off, a norm of inf measures the gradient without changing it.
        limit = self.t.grad_clip if self.t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if self.world.distributed and not enabled:
            return self.forward.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches per split, the same batches at every evaluation."""
        self.model.eval()
        losses = {}
        for index, (name, tokens) in enumerate(self.splits.items()):
            # A generator of its own: evaluation must not move the training batch stream.
            windows = RandomWindows(tokens, self.params.model.block_size, self.t.batch_size,
                                    batch_seed(self.params.seed + 1 + index, self.world.rank))
            total = torch.zeros((), device=self.device)
            for _ in range(self.t.eval_iters):
                inputs, targets = windows.next(self.device)
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(inputs, targets)
                total += loss.float()
            losses[name] = (mean_over_ranks(total, self.world) / self.t.eval_iters).item()
        self.model.train()
        return losses

    def evaluate_and_log(self, step: int) -> None:
        losses = self.evaluate()
        self.check_finite(losses["val"], step)
        self.last_eval = losses
        best = self.state.best_val_loss
        self.state.best_val_loss = losses["val"] if best is None else min(best, losses["val"])
        self.log(step, val_loss=losses["val"])
        if self.world.is_main:
            tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss "
                       f"{losses['val']:.4f}", file=sys.stderr)

    def log(self, step: int, **values: float) -> None:
        """Add values to the log row of `step`, creating it if this is the step's first entry."""
        rows = self.state.log
        if not rows or rows[-1]["step"] != step:
            rows.append({"step": step, "tokens": step * self.tokens_per_step})
        rows[-1].update(values)

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            last = self.checkpoint_step()
            raise GptlabError(f"train: loss became {loss} at step {step}; the last good "
                              f"checkpoint is from step {last}. Lower train.lr, or set "
                              f"train.grad_clip, or use train.dtype: float32")

    def checkpoint_step(self) -> int:
        path = self.checkpoint_dir / "state.json"
        return json.loads(path.read_text())["step"] if path.exists() else 0

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with every other process's streams gathered in."""
        ranks = gather_to_all(rank_state(self.batches, self.device,
                                         self.state.interval_loss_sum), self.world)
        self.state.batch_rng = ranks[0]["batch_rng"]
        self.state.other_ranks = ranks[1:]
        self.state.scaler = self.scaler.state_dict() if self.scaler.is_enabled() else {}
        self.state.wall_seconds += time.perf_counter() - self._started
        self._started = time.perf_counter()
        if not self.world.is_main:
            return
        save_resume(self.checkpoint_dir, self.model, self.optimizer, self.state)
        save_published(self.model, self.model.config, self.paths.tokens_dir / "tokenizer.json",
                       self.summary(), self.paths.models_dir)
        write_log_csv(self.state.log, self.paths.log_csv)

    def summary(self) -> dict[str, Any]:
        return {"step": self.state.step, "seed": self.params.seed,
                "train": self.params.train.model_dump(), "val_loss": self.last_eval.get("val"),
                "torch_version": torch.__version__, "gptlab_version": __version__}

    def metrics(self, tokenizer_kind: str) -> dict[str, Any]:
        rates = [row["tokens_per_sec"] for row in self.state.log if "tokens_per_sec" in row]
        tokens_per_sec = statistics.median(rates) if rates else None
        # tokens_per_sec counts every process's tokens: the peak is that of all their devices.
        peak = (peak_flops(self.device, self.dtype) or 0) * self.world.size
        mfu = (self.model.flops_per_token() * tokens_per_sec / peak
               if peak and tokens_per_sec else None)
        return {
            "final_train_loss": round(self.last_eval["train"], 6),
            "final_val_loss": round(self.last_eval["val"], 6),
            "best_val_loss": round(self.state.best_val_loss, 6),
            "tokens_per_sec": round(tokens_per_sec, 1) if tokens_per_sec else None,
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "params": self.model.num_params(),
            "wall_seconds": round(self.state.wall_seconds, 2),
            "device": device_name(self.device),
            "processes": self.world.size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch_version": torch.__version__,
            "tokenizer": tokenizer_kind,
        }


def write_log_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The per-step log as CSV; columns a row does not have stay empty."""
    lines = [",".join(LOG_COLUMNS)]
    for row in rows:
        lines.append(",".join(_csv_value(row.get(column)) for column in LOG_COLUMNS))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class StopRequest:
    requested: bool = False


@contextlib.contextmanager
def sigint_as_stop_request() -> Iterator[StopRequest]:
    """Turn Ctrl-C (or SIGTERM, as torchrun and batch schedulers send) into a request the loop
    honours after the current step (under DDP, at the next log interval), with a checkpoint.

    Stopping mid-step would save half-accumulated gradients; a second Ctrl-C stops at once.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread may handle signals
        return

    def on_sigint(signum: int, frame: Any) -> None:
        # Only a second Ctrl-C aborts: a scheduler's SIGTERM often arrives twice (once to the
        # job, once forwarded by torchrun), and must still end with a checkpoint.
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)",
                   file=sys.stderr)

    previous = {signum: signal.signal(signum, on_sigint)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
