"""Training: the loop that turns token files into a model.

Each step sets the learning rate, accumulates gradients over micro-batches, clips them and
updates the weights; at their intervals the loop logs, evaluates and checkpoints. Everything
random (weights, dropout, batches) flows from `seed` and is saved with each checkpoint, so a
run killed at any point and started again ends exactly where an uninterrupted run would.

Under torchrun this is one process of a data-parallel run (see gptlab.distributed); a plain
process is a world of one, so there is a single code path.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gptlab import __version__
from gptlab.batches import (
    SPLITS,
    ConversationWindows,
    RandomWindows,
    batch_seed,
    open_training_splits,
    split_windows,
)
from gptlab.checkpoint import (
    ResumeState,
    agree_on_checkpoint,
    load_resume,
    newest_good_checkpoint,
    rank_state,
    restore_rank_state,
    run_key,
    save_resume,
)
from gptlab.device import (
    allow_tf32,
    autocast,
    device_name,
    peak_flops,
    peak_memory_mb,
    pick_device,
    pick_dtype,
    reset_peak_memory,
    synchronize,
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
from gptlab.lora import adapter_state_dict, add_adapters, has_adapters, merged_state_dict
from gptlab.model import GPT, Bigram, build_model
from gptlab.optim import learning_rate, make_optimizer, set_learning_rate
from gptlab.params import ModelConfig, RunParams, TrainParams
from gptlab.pretrained import init_source, initial_weights
from gptlab.published import save_published
from gptlab.stop import StopRequest, sigint_as_stop_request
from gptlab.tokens import read_meta, tokenizer_path
from gptlab.trainlog import write_log


@dataclass(frozen=True)
class TrainPaths:
    tokens_dir: Path  # read: the tokenize stage's token shards and meta.json
    models_dir: Path  # written: the published model
    log_csv: Path  # written: the per-step log
    runs_dir: Path  # resume checkpoints, outside DVC's outputs (DVC deletes those first)


def train(params: RunParams, paths: TrainPaths) -> dict[str, Any] | None:
    """Train the model described by params on the token files; return the run's metrics, or
    None when a stop request (Ctrl-C, SIGTERM) ended it early, after a checkpoint.

    The process's place in a data-parallel run comes from torchrun's environment (a world of
    one without it)."""
    world = world_from_env()
    if params.train.grad_accum % world.size:
        raise GptlabError(f"train.grad_accum: {params.train.grad_accum} is not divisible by the "
                          f"{world.size} processes of this run")
    # params.yaml was checked against train.nproc; torchrun started by hand may start others.
    if problem := params.train.cuda_graph_problem(world.size):
        raise GptlabError(f"train.compile_mode: {problem}")
    device = device_for_rank(pick_device(params.train.device, "train.device"), world)
    with process_group(world, device):
        session = start_session(params, paths, world, device)
        with sigint_as_stop_request() as stop:
            stopped = session.run(stop)
        return None if stopped else session.finished_metrics()


def start_session(params: RunParams, paths: TrainPaths, world: World,
                  device: torch.device) -> TrainingSession:
    """One process's share of the run, set up: seeded, its model built (pretrained weights and
    LoRA adapters if asked), and resumed from the newest good checkpoint of the run if any."""
    t = params.train
    dtype = pick_dtype(t.dtype, device, "train.dtype")
    meta = read_meta(paths.tokens_dir, [f"{split}_{key}" for split in SPLITS
                                        for key in ("tokens", "shards")])
    splits = open_training_splits(paths.tokens_dir, meta, params.model.block_size)
    allow_tf32(device)
    reset_peak_memory(device)

    torch.manual_seed(params.seed)  # the same initial weights in every process
    config = ModelConfig.of(params.model, meta["vocab_size"])
    model = build_model(config).to(device)
    run_dir = paths.runs_dir / run_key(params, meta, world.size)
    checkpoint = newest_checkpoint(run_dir, world)
    if checkpoint is None and params.model.pretrained:  # a checkpoint has its own weights
        model.load_state_dict(initial_weights(params.model.init, config, paths.tokens_dir))
    if t.lora.rank:
        add_adapters(model, t.lora)
    if world.rank > 0:
        torch.manual_seed(params.seed + world.rank)  # but dropout masks of its own
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = split_windows(paths.tokens_dir, meta, "train", splits["train"],
                            params.model.block_size, t.batch_size,
                            batch_seed(params.seed, world.rank))
    resumed, interval = ResumeState(), LogInterval(device)
    if checkpoint is not None:
        resumed = load_resume(checkpoint, model, optimizer, device)
        restore_rank_state(resumed, world, batches.rng, device)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        interval.load_state_dict(resumed.rank_interval(world.rank))
        say(f"resuming from step {resumed.step} ({checkpoint})", world)
    return TrainingSession(params, paths, world, device, dtype=dtype, meta=meta, splits=splits,
                           model=model, forward=training_forward(model, t, world, device),
                           optimizer=optimizer, scaler=scaler, batches=batches,
                           run_dir=run_dir, resumed=resumed, interval=interval)


def newest_checkpoint(run_dir: Path, world: World) -> Path | None:
    """The newest checkpoint of the run that passes its checksums, the same for every process;
    damaged ones are reported and removed."""
    folder, damaged = newest_good_checkpoint(run_dir)
    agree_on_checkpoint(folder, run_dir, world)
    for error in damaged:
        fallback = f"falling back to {folder.name}" if folder else "no checkpoint before it"
        say(f"{error}; removed it, {fallback}", world)
        if world.is_main:
            shutil.rmtree(error.folder, ignore_errors=True)
    if folder is None and damaged:
        say("no good resume checkpoint left: starting afresh", world)
    return folder


def training_forward(model: nn.Module, t: TrainParams, world: World,
                     device: torch.device) -> nn.Module:
    """The model's forward as training calls it: compiled if asked, wrapped by DDP when there
    are several processes."""
    forward = model
    if t.compile:
        forward = torch.compile(forward, mode=t.compile_mode)
    if world.distributed:
        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return forward


class LogInterval:
    """The steps since the last log row: their summed loss, kept on the device so that it is
    read once per interval (one host sync), and the seconds the steps took (evaluations and
    checkpoints are not clocked). It is saved with each checkpoint, so a resumed run logs the
    interval as an uninterrupted one would."""

    def __init__(self, device: torch.device) -> None:
        self.steps = 0
        self.loss_sum = torch.zeros((), device=device)
        self.seconds = 0.0
        self.device = device
        self.clock = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The interval as JSON values (reading the loss waits for the device)."""
        return {"steps": self.steps, "loss_sum": self.loss_sum.item(), "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.seconds = state["steps"], state["seconds"]
        self.loss_sum.fill_(state["loss_sum"])

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def pause(self) -> None:
        # Kernels run asynchronously: the steps' time is spent once the device has caught up.
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.clock

    def resume(self) -> None:
        self.clock = time.perf_counter()

    def close(self, world: World) -> tuple[float, int, float]:
        """Mean loss (over every process), steps and seconds of the interval; start the next."""
        mean_loss = (mean_over_ranks(self.loss_sum, world) / self.steps).item()
        self.pause()
        closed = mean_loss, self.steps, self.seconds
        self.loss_sum.zero_()
        self.steps, self.seconds = 0, 0.0
        self.resume()
        return closed


class TrainingSession:
    """One process's share of a run, set up by start_session: its model, optimizer and
    batches, the run so far (step, log, evaluations), and the loop with its evaluations, logs
    and checkpoints."""

    def __init__(self, params: RunParams, paths: TrainPaths, world: World,
                 device: torch.device, *, dtype: torch.dtype, meta: dict[str, Any],
                 splits: dict[str, list[np.ndarray]], model: GPT | Bigram, forward: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 batches: RandomWindows | ConversationWindows, run_dir: Path,
                 resumed: ResumeState, interval: LogInterval) -> None:
        self.params, self.t, self.paths = params, params.train, paths
        self.world, self.device, self.dtype = world, device, dtype
        self.meta, self.splits = meta, splits
        self.model, self.forward, self.optimizer, self.scaler = model, forward, optimizer, scaler
        self.batches, self.run_dir = batches, run_dir
        # The run so far: advanced by the loop, saved by each checkpoint as a ResumeState.
        self.saved = resumed  # the newest checkpoint's state
        self.step, self.log_rows = resumed.step, list(resumed.log)
        self.best_val_loss, self.last_eval = resumed.best_val_loss, resumed.last_eval
        self.wall_seconds, self.clock = resumed.wall_seconds, time.perf_counter()
        self.interval = interval

    @property
    def micro_batches(self) -> int:
        return self.t.grad_accum // self.world.size

    @property
    def tokens_per_step(self) -> int:
        return self.t.batch_size * self.t.grad_accum * self.params.model.block_size

    def run(self, stop: StopRequest) -> bool:
        """Train from the resumed step to max_iters; return whether a stop request ended the
        run early (after the current step, with a checkpoint)."""
        t = self.t
        if self.step == 0:
            self.evaluate_and_log(0)
        if self.step == t.max_iters:  # a finished run, rerun: its outputs may be gone
            self.publish()
            return False
        self.interval.resume()  # the clock runs from the first step
        with tqdm(total=t.max_iters, initial=self.step, unit="step", desc="train",
                  disable=None if self.world.is_main else True, file=sys.stderr) as progress:
            while self.step < t.max_iters:
                step = self.step + 1
                lr = learning_rate(step - 1, t)
                set_learning_rate(self.optimizer, lr)
                loss, grad_norm = self.optimizer_step()
                self.interval.add(loss)
                self.step = step
                progress.update(1)

                at_log = due(step, t.log_interval, t.max_iters)
                if at_log:
                    self.close_interval(step, lr, grad_norm, progress)
                # Under DDP the processes exchange their stop requests at log steps only (one
                # small all-reduce), so that every process stops at the same step.
                stopping = ((at_log or not self.world.distributed)
                            and any_rank(stop.requested, self.world, self.device))
                evaluate = due(step, t.eval_interval, t.max_iters)
                checkpoint = due(step, t.checkpoint_interval, t.max_iters) or stopping
                if evaluate or checkpoint:
                    self.interval.pause()
                    if evaluate:
                        self.evaluate_and_log(step)
                    if checkpoint:
                        self.save_checkpoint()
                    if stopping:
                        return True
                    self.interval.resume()
        return False

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

    def close_interval(self, step: int, lr: float, grad_norm: torch.Tensor,
                       progress: tqdm) -> None:
        """The interval's log row: mean train loss, learning rate, gradient norm, speed."""
        mean_loss, steps, seconds = self.interval.close(self.world)
        self.check_finite(mean_loss, step)
        rate = steps * self.tokens_per_step / seconds
        self.log(step, train_loss=mean_loss, lr=lr, grad_norm=float(grad_norm),
                 tokens_per_sec=rate)
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        if progress.disable and self.world.is_main:  # no terminal for a bar: a line instead
            left = (self.t.max_iters - step) * seconds / steps
            print(f"step {step}/{self.t.max_iters}: loss {mean_loss:.4f}, lr {lr:.2e}, "
                  f"{rate:,.0f} tokens/s, {format_duration(left)} left", file=sys.stderr)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches per split, the same batches at every evaluation."""
        self.model.eval()
        losses = {}
        for index, (name, tokens) in enumerate(self.splits.items()):
            # A generator of its own: evaluation must not move the training batch stream.
            windows = split_windows(self.paths.tokens_dir, self.meta, name, tokens,
                                    self.params.model.block_size, self.t.batch_size,
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
        best = self.best_val_loss
        self.best_val_loss = losses["val"] if best is None else min(best, losses["val"])
        self.log(step, val_loss=losses["val"])
        if self.world.is_main:
            tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss "
                       f"{losses['val']:.4f}", file=sys.stderr)

    def log(self, step: int, **values: float) -> None:
        """Add values to the log row of `step` (creating it if this is the step's first entry)
        and write the log, so that `dvc plots show` draws a run in progress."""
        rows = self.log_rows
        if not rows or rows[-1]["step"] != step:
            rows.append({"step": step, "tokens": step * self.tokens_per_step})
        rows[-1].update(values)
        if self.world.is_main:
            write_log(rows, self.paths.log_csv)

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            folder, _ = newest_good_checkpoint(self.run_dir)
            last = folder.name if folder else "none"
            raise GptlabError(f"train: loss became {loss} at step {step}; the last good "
                              f"checkpoint is {last}. Lower train.lr, or set train.grad_clip, "
                              f"or use train.dtype: float32")

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with every other process's streams gathered in, then
        publishes the weights and the log so far; the last one also holds the run's metrics."""
        interval = self.interval.state_dict()
        # The steps since the last log row are checked too: no checkpoint holds a NaN.
        if any_rank(not math.isfinite(interval["loss_sum"]), self.world, self.device):
            self.check_finite(math.nan, self.step)
        ranks = gather_to_all(rank_state(self.batches.rng, self.device, interval), self.world)
        self.wall_seconds += time.perf_counter() - self.clock
        self.clock = time.perf_counter()
        finished = self.step == self.t.max_iters
        self.saved = ResumeState(
            step=self.step, batch_rng=ranks[0]["batch_rng"], best_val_loss=self.best_val_loss,
            wall_seconds=self.wall_seconds, log=list(self.log_rows),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            interval=interval, last_eval=self.last_eval,
            metrics=self.metrics() if finished else None, other_ranks=ranks[1:])
        if self.world.is_main:
            save_resume(self.run_dir, self.model, self.optimizer, self.saved, self.device)
            self.publish()

    def publish(self) -> None:
        """The weights (adapters merged in) and the log as of the current state, for the
        stages after this one."""
        if not self.world.is_main:
            return
        model, adapters = self.model, None
        if has_adapters(self.model):
            model = build_model(self.model.config).to(self.device)
            model.load_state_dict(merged_state_dict(self.model))
            adapters = adapter_state_dict(self.model)
        save_published(model, self.model.config, tokenizer_path(self.paths.tokens_dir),
                       self.summary(), self.paths.models_dir, adapters)
        write_log(self.log_rows, self.paths.log_csv)  # again: a republished run's log is gone

    def summary(self) -> dict[str, Any]:
        """What produced the published weights, for models/config.json: how far training got,
        with which params, and on what."""
        return {"step": self.step, "seed": self.params.seed,
                "train": self.params.train.model_dump(),
                "val_loss": self.last_eval.get("val"),
                **init_source(self.params.model.init), "lora": self.t.lora.model_dump(),
                "device": device_name(self.device), "processes": self.world.size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "python_version": platform.python_version(), "torch_version": torch.__version__,
                "gptlab_version": __version__}

    def finished_metrics(self) -> dict[str, Any]:
        """The run's metrics, as its last checkpoint saved them."""
        assert self.saved.metrics is not None, "the run has not finished"
        return self.saved.metrics

    def metrics(self) -> dict[str, Any]:
        rates = [row["tokens_per_sec"] for row in self.log_rows if "tokens_per_sec" in row]
        tokens_per_sec = statistics.median(rates) if rates else None
        # tokens_per_sec counts every process's tokens: the peak is that of all their devices.
        peak = (peak_flops(self.device, self.dtype) or 0) * self.world.size
        mfu = (self.model.flops_per_token() * tokens_per_sec / peak
               if peak and tokens_per_sec else None)
        return {
            "final_train_loss": round(self.last_eval["train"], 6),
            "final_val_loss": round(self.last_eval["val"], 6),
            "best_val_loss": round(self.best_val_loss, 6),
            "tokens_per_sec": round(tokens_per_sec, 1) if tokens_per_sec else None,
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "parameters": self.model.num_params(),
            "trainable_parameters": self.model.num_params(trainable=True),
            "wall_seconds": round(self.wall_seconds, 2),
        }

def say(message: str, world: World) -> None:
    if world.is_main:
        print(message, file=sys.stderr)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def due(step: int, interval: int, last_step: int) -> bool:
    """Whether something done every `interval` steps, and at the end, is done at `step`."""
    return step % interval == 0 or step == last_step
