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

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gptlab import __version__
from gptlab.batches import SPLITS, batch_seed, open_training_splits, split_windows
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
from gptlab.model import build_model
from gptlab.optim import learning_rate, make_optimizer, set_learning_rate
from gptlab.params import ModelConfig, RunParams
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


def train(params: RunParams, paths: TrainPaths, world: World | None = None) -> dict[str, Any]:
    """Train the model described by params on the token files; return the run's metrics."""
    world = world or world_from_env()
    if params.train.grad_accum % world.size:
        raise GptlabError(f"train.grad_accum: {params.train.grad_accum} is not divisible by the "
                          f"{world.size} processes of this run")
    # params.yaml was checked against train.nproc; torchrun started by hand may start others.
    if problem := params.train.cuda_graph_problem(world.size):
        raise GptlabError(f"train.compile_mode: {problem}")
    device = device_for_rank(pick_device(params.train.device, "train.device"), world)
    with process_group(world, device):
        session = TrainingSession(params, paths, world, device)
        with sigint_as_stop_request() as stop:
            session.run(stop)
        return session.finished_metrics()


class LogInterval:
    """The steps since the last log row: their summed loss, kept on the device so that it is
    read once per interval (one host sync), and the seconds the steps took (evaluations and
    checkpoints are not clocked). All three survive a checkpoint, so a resumed run logs the
    interval as an uninterrupted one would."""

    def __init__(self, steps: int, loss_sum: float, seconds: float,
                 device: torch.device) -> None:
        self.steps = steps
        self.loss_sum = torch.tensor(loss_sum, device=device)
        self.seconds = seconds
        self.device = device
        self.clock = time.perf_counter()

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
    """One process's share of a run: its model, optimizer and batches, resumed where the last
    checkpoint left them, and the loop with its evaluations, logs and checkpoints."""

    def __init__(self, params: RunParams, paths: TrainPaths, world: World,
                 device: torch.device) -> None:
        t = params.train
        self.params, self.t, self.paths, self.world, self.device = params, t, paths, world, device
        self.dtype = pick_dtype(t.dtype, device, "train.dtype")
        self.meta = read_meta(paths.tokens_dir, [f"{split}_{key}" for split in SPLITS
                                                 for key in ("tokens", "shards")])
        self.splits = open_training_splits(paths.tokens_dir, self.meta, params.model.block_size)
        allow_tf32(device)
        reset_peak_memory(device)

        torch.manual_seed(params.seed)  # the same initial weights in every process
        self.config = ModelConfig.of(params.model, self.meta["vocab_size"])
        self.model = build_model(self.config).to(device)
        self.run_dir = paths.runs_dir / run_key(params, self.meta, world.size)
        checkpoint = self.newest_checkpoint()
        if checkpoint is None and params.model.pretrained:  # a checkpoint has its own weights
            self.model.load_state_dict(initial_weights(params.model.init, self.config,
                                                       paths.tokens_dir))
        if t.lora.rank:
            add_adapters(self.model, t.lora)
        if world.rank > 0:
            torch.manual_seed(params.seed + world.rank)  # but dropout masks of its own
        self.optimizer = make_optimizer(self.model, t, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.batches = split_windows(paths.tokens_dir, self.meta, "train", self.splits["train"],
                                     params.model.block_size, t.batch_size,
                                     batch_seed(params.seed, world.rank))
        self.state = self.resume(checkpoint)
        self.forward = self.fast_forward()

        self.micro_batches = t.grad_accum // world.size
        self.tokens_per_step = t.batch_size * t.grad_accum * params.model.block_size
        self._started = time.perf_counter()

    def newest_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run that passes its checksums, the same for every
        process; damaged ones are reported and removed."""
        folder, damaged = newest_good_checkpoint(self.run_dir)
        agree_on_checkpoint(folder, self.run_dir, self.world)
        for error in damaged:
            fallback = f"falling back to {folder.name}" if folder else "no checkpoint before it"
            self.say(f"{error}; removed it, {fallback}")
            if self.world.is_main:
                shutil.rmtree(error.folder, ignore_errors=True)
        if folder is None and damaged:
            self.say("no good resume checkpoint left: starting afresh")
        return folder

    def resume(self, folder: Path | None) -> ResumeState:
        """The state of checkpoint `folder`, with model, optimizer and streams restored to it;
        a fresh state without one."""
        if folder is None:
            return ResumeState(step=0, batch_rng=self.batches.rng.bit_generator.state,
                               best_val_loss=None, wall_seconds=0.0)
        state = load_resume(folder, self.model, self.optimizer, self.device)
        restore_rank_state(state, self.world, self.batches.rng, self.device)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.say(f"resuming from step {state.step} ({folder})")
        return state

    def fast_forward(self) -> nn.Module:
        """The model's forward as training calls it: compiled if asked, wrapped by DDP when
        there are several processes."""
        forward: nn.Module = self.model
        if self.t.compile:
            forward = torch.compile(forward, mode=self.t.compile_mode)
        if self.world.distributed:
            forward = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return forward

    def run(self, stop: StopRequest) -> None:
        """Train from the resumed step to max_iters; a stop request ends the run after the
        current step with a checkpoint, as KeyboardInterrupt."""
        t, state = self.t, self.state
        if state.step == 0:
            self.evaluate_and_log(0)
        if state.step == t.max_iters:  # a finished run, rerun: its outputs may be gone
            self.publish()
            return
        interval = LogInterval(state.interval_steps, state.interval_loss_sum,
                               state.interval_seconds, self.device)
        with tqdm(total=t.max_iters, initial=state.step, unit="step", desc="train",
                  disable=None if self.world.is_main else True, file=sys.stderr) as progress:
            while state.step < t.max_iters:
                step = state.step + 1
                lr = learning_rate(step - 1, t)
                set_learning_rate(self.optimizer, lr)
                loss, grad_norm = self.optimizer_step()
                interval.add(loss)
                state.step = step
                progress.update(1)

                at_log = due(step, t.log_interval, t.max_iters)
                if at_log:
                    self.close_interval(step, interval, lr, grad_norm, progress)
                # Under DDP the processes exchange their stop requests at log steps only (one
                # small all-reduce), so that every process stops at the same step.
                stopping = ((at_log or not self.world.distributed)
                            and any_rank(stop.requested, self.world, self.device))
                evaluate = due(step, t.eval_interval, t.max_iters)
                checkpoint = due(step, t.checkpoint_interval, t.max_iters) or stopping
                if evaluate or checkpoint:
                    interval.pause()
                    if evaluate:
                        self.evaluate_and_log(step)
                    if checkpoint:
                        self.save_checkpoint(interval)
                    if stopping:
                        raise KeyboardInterrupt
                    interval.resume()

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

    def close_interval(self, step: int, interval: LogInterval, lr: float,
                       grad_norm: torch.Tensor, progress: tqdm) -> None:
        """The interval's log row: mean train loss, learning rate, gradient norm, speed."""
        mean_loss, steps, seconds = interval.close(self.world)
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
        self.state.last_eval = losses
        best = self.state.best_val_loss
        self.state.best_val_loss = losses["val"] if best is None else min(best, losses["val"])
        self.log(step, val_loss=losses["val"])
        if self.world.is_main:
            tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss "
                       f"{losses['val']:.4f}", file=sys.stderr)

    def log(self, step: int, **values: float) -> None:
        """Add values to the log row of `step` (creating it if this is the step's first entry)
        and write the log, so that `dvc plots show` draws a run in progress."""
        rows = self.state.log
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

    def save_checkpoint(self, interval: LogInterval) -> None:
        """Rank 0 writes the checkpoint, with every other process's streams gathered in, then
        publishes the weights and the log so far; the last one also holds the run's metrics."""
        state = self.state
        state.interval_steps, state.interval_seconds = interval.steps, interval.seconds
        state.interval_loss_sum = interval.loss_sum.item()
        # The steps since the last log row are checked too: no checkpoint holds a NaN.
        if any_rank(not math.isfinite(state.interval_loss_sum), self.world, self.device):
            self.check_finite(math.nan, state.step)
        ranks = gather_to_all(rank_state(self.batches.rng, self.device, state.interval_loss_sum),
                              self.world)
        state.batch_rng = ranks[0]["batch_rng"]
        state.other_ranks = ranks[1:]
        state.scaler = self.scaler.state_dict() if self.scaler.is_enabled() else {}
        state.wall_seconds += time.perf_counter() - self._started
        self._started = time.perf_counter()
        if state.step == self.t.max_iters:
            state.metrics = self.metrics()
        if not self.world.is_main:
            return
        save_resume(self.run_dir, self.model, self.optimizer, state, self.device)
        self.publish()

    def publish(self) -> None:
        """The weights (adapters merged in) and the log as of the current state, for the
        stages after this one."""
        if not self.world.is_main:
            return
        model, adapters = self.model, None
        if has_adapters(self.model):
            model = build_model(self.config).to(self.device)
            model.load_state_dict(merged_state_dict(self.model))
            adapters = adapter_state_dict(self.model)
        save_published(model, self.config, tokenizer_path(self.paths.tokens_dir),
                       self.summary(), self.paths.models_dir, adapters)
        write_log(self.state.log, self.paths.log_csv)  # again: a republished run's log is gone

    def summary(self) -> dict[str, Any]:
        """What produced the published weights, for models/config.json: how far training got,
        with which params, and on what."""
        return {"step": self.state.step, "seed": self.params.seed,
                "train": self.params.train.model_dump(),
                "val_loss": self.state.last_eval.get("val"),
                **init_source(self.params.model.init), "lora": self.t.lora.model_dump(),
                "device": device_name(self.device), "processes": self.world.size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "python_version": platform.python_version(), "torch_version": torch.__version__,
                "gptlab_version": __version__}

    def finished_metrics(self) -> dict[str, Any]:
        """The run's metrics, as its last checkpoint saved them."""
        assert self.state.metrics is not None, "the run has not finished"
        return self.state.metrics

    def metrics(self) -> dict[str, Any]:
        rates = [row["tokens_per_sec"] for row in self.state.log if "tokens_per_sec" in row]
        tokens_per_sec = statistics.median(rates) if rates else None
        # tokens_per_sec counts every process's tokens: the peak is that of all their devices.
        peak = (peak_flops(self.device, self.dtype) or 0) * self.world.size
        mfu = (self.model.flops_per_token() * tokens_per_sec / peak
               if peak and tokens_per_sec else None)
        return {
            "final_train_loss": round(self.state.last_eval["train"], 6),
            "final_val_loss": round(self.state.last_eval["val"], 6),
            "best_val_loss": round(self.state.best_val_loss, 6),
            "tokens_per_sec": round(tokens_per_sec, 1) if tokens_per_sec else None,
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "parameters": self.model.num_params(),
            "trainable_parameters": self.model.num_params(trainable=True),
            "wall_seconds": round(self.state.wall_seconds, 2),
        }

    def say(self, message: str) -> None:
        if self.world.is_main:
            print(message, file=sys.stderr)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def due(step: int, interval: int, last_step: int) -> bool:
    """Whether something done every `interval` steps, and at the end, is done at `step`."""
    return step % interval == 0 or step == last_step
