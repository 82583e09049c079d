"""Tests of gptlab.bench.ladder, the GPU speed ladder, run on the CPU with a tiny model.

Timings are never asserted (see the module's docstring): only that each row measured what it
names, with training's own step, at the batch it reports, and that the figures agree with each
other. There is no GPU here, so running out of memory is simulated by a step function that
raises it above a size.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from itertools import pairwise
from typing import Any

import pytest
import torch
from helpers import (
    PROJECT_PARAMS,
    TINY_MODEL,
    TINY_TRAIN,
    make_corpus,
    model_config,
    paths_in,
    run_params,
    write_tokens,
)

from gptlab.bench import __main__ as bench_main
from gptlab.bench import gpt2_cpu
from gptlab.bench import ladder as bench
from gptlab.bench.ladder import (
    GPT2_OPTIMIZER,
    GPT2_SHAPE,
    RUNGS,
    LadderRow,
    Settings,
    flops_per_token,
    format_row,
    ladder,
    largest_fitting,
    on_foreach_kernel,
    speed_ladder,
)
from gptlab.model import build_model
from gptlab.optim import make_optimizer
from gptlab.params import ModelConfig
from gptlab.train import TrainingSession, train

CPU = torch.device("cpu")
# Vocabulary 100 pads to 128, so the padded-vocab row changes the tables.
TINY = model_config(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=16)
# Compiling takes about a minute even for a tiny model: the tests leave it out.
CHEAP_ROWS = ladder(compile=False)


def switched_on(settings: Settings) -> set[str]:
    return {name for name, value in dataclasses.asdict(settings).items() if value}


def run_ladder(**overrides: Any) -> list[LadderRow]:
    arguments = dict(device=CPU, train=PROJECT_PARAMS.train, shape=TINY, steps=2, max_batch=4,
                     rows=CHEAP_ROWS, warmup=1)
    return speed_ladder(**(arguments | overrides))


# --- the rows ----------------------------------------------------------------------------------


def test_each_row_adds_exactly_one_setting_to_the_previous_row():
    rows = ladder()
    assert [row.name for row in rows] == [name for name, _ in RUNGS]
    assert switched_on(rows[0].settings) == set()
    for previous, row in pairwise(rows):
        added = switched_on(row.settings) - switched_on(previous.settings)
        assert switched_on(previous.settings) < switched_on(row.settings), row.name
        assert len(added) == 1, row.name
    assert switched_on(rows[-1].settings) == {field.name for field in dataclasses.fields(Settings)}


def test_ladder_without_compile_compiles_in_no_row():
    assert "+ torch.compile" not in [row.name for row in CHEAP_ROWS]
    assert not any(row.settings.compile for row in CHEAP_ROWS)
    assert len(CHEAP_ROWS) == len(RUNGS) - 1
    for previous, row in pairwise(CHEAP_ROWS):
        assert switched_on(previous.settings) < switched_on(row.settings), row.name


def test_gpt2_shape_is_gpt2_small_with_its_true_vocabulary_as_nanogpt_times_it():
    model_shape = (GPT2_SHAPE.n_layer, GPT2_SHAPE.n_head, GPT2_SHAPE.n_embd, GPT2_SHAPE.block_size)
    assert model_shape == (12, 12, 768, 1024)
    assert GPT2_SHAPE.vocab_size == 50257
    assert GPT2_SHAPE.model_copy(update={"pad_vocab": True}).padded_vocab_size == 50304
    # GPT-2 small but for nanoGPT's speed-run choices: no biases, the exact GELU, no padding.
    differences = {key for key, value in GPT2_SHAPE.model_dump().items()
                   if value != getattr(ModelConfig.from_name("gpt2"), key)}
    assert differences == {"bias", "mlp", "pad_vocab"}


# --- measuring ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_row_reports_consistent_figures_on_cpu():
    rows = run_ladder()
    assert [row.name for row in rows] == [rung.name for rung in CHEAP_ROWS]
    for row, rung in zip(rows, CHEAP_ROWS, strict=True):
        assert row.settings == rung.settings
        assert row.batch_size == 4  # nothing runs out of memory: the cap is taken
        assert row.ms_per_step > 0
        tokens_per_step = row.batch_size * TINY.block_size
        assert row.tokens_per_sec == pytest.approx(tokens_per_step / (row.ms_per_step / 1000))
        assert row.mfu is None  # no peak FLOP/s for a CPU


@pytest.mark.slow
def test_each_row_runs_with_what_it_names_and_restores_the_backends():
    seen: list[dict[str, Any]] = []
    tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def recording_step(session: TrainingSession):
        seen.append({
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "dtype": session.dtype,
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
            "vocab_rows": session.model.lm_head.weight.shape[0],
            "fused": session.optimizer.defaults["fused"],
            "foreach": session.optimizer.defaults["foreach"],
            "decay": [group["weight_decay"] for group in session.optimizer.param_groups],
            "micro_batches": session.micro_batches,
            "clip": session.t.grad_clip,
        })
        session.optimizer_step()

    # One warmup and one timed step per row: the first record of each pair is enough.
    run_ladder(steps=1, step_fn=recording_step)
    records = seen[::2]
    assert len(records) == len(CHEAP_ROWS)
    for record, rung in zip(records, CHEAP_ROWS, strict=True):
        s = rung.settings
        assert record["tf32"] is s.tf32 and record["cudnn_tf32"] is s.tf32, rung.name
        assert record["dtype"] == (torch.bfloat16 if s.bf16 else torch.float32), rung.name
        # Exactly one attention kernel allowed: the row cannot measure another.
        assert (record["flash"], record["math"]) == (s.flash, not s.flash), rung.name
        assert record["vocab_rows"] == (128 if s.pad_vocab else TINY.vocab_size), rung.name
        # Training's fused kernel, or the foreach one it replaces: never the per-tensor loop.
        assert bool(record["fused"]) is s.fused_adamw, rung.name
        assert bool(record["foreach"]) is not s.fused_adamw, rung.name
        # Training's parameter groups either way: matrices decay, the rest does not.
        assert record["decay"] == [GPT2_OPTIMIZER["weight_decay"], 0.0], rung.name
        assert (record["micro_batches"], record["clip"]) == (1, GPT2_OPTIMIZER["grad_clip"])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32_before


def test_each_row_times_the_asked_number_of_steps_after_warmup():
    calls: list[int] = []

    def counting_step(session: TrainingSession):
        calls.append(session.batches.batch_size)
        session.optimizer_step()

    run_ladder(rows=CHEAP_ROWS[:1], steps=3, warmup=2, step_fn=counting_step)
    assert calls == [4] * 5


def test_the_timed_step_is_trainings_own_on_random_tokens(monkeypatch):
    losses: list[float] = []
    real_step = TrainingSession.optimizer_step

    def watched_step(session: TrainingSession):
        loss, grad_norm = real_step(session)
        losses.append(loss.item())
        return loss, grad_norm

    monkeypatch.setattr(TrainingSession, "optimizer_step", watched_step)
    run_ladder(rows=CHEAP_ROWS[:1], steps=3, warmup=2)
    assert len(losses) == 5
    # Random tokens: the loss of a uniform guess over the vocabulary, and no better.
    assert losses == pytest.approx([math.log(TINY.vocab_size)] * 5, abs=0.3)


def test_the_foreach_optimizer_is_trainings_but_for_the_kernel():
    model = build_model(TINY)
    adamw = PROJECT_PARAMS.train.model_copy(update={"optimizer": "adamw"})
    fused = make_optimizer(model, adamw, CPU)
    foreach = on_foreach_kernel(fused)
    assert (fused.defaults["fused"], foreach.defaults["fused"]) == (True, None)
    assert foreach.defaults["foreach"] is True
    for theirs, ours in zip(fused.param_groups, foreach.param_groups, strict=True):
        assert [id(p) for p in theirs["params"]] == [id(p) for p in ours["params"]]
        kept = {key for key in theirs if key not in ("fused", "foreach", "params")}
        assert {key: theirs[key] for key in kept} == {key: ours[key] for key in kept}


def test_mfu_is_model_flops_over_the_peak(monkeypatch):
    monkeypatch.setattr(bench, "peak_flops", lambda device, dtype: 1e12)
    for row in run_ladder(rows=CHEAP_ROWS[-2:]):
        config = TINY.model_copy(update={"pad_vocab": row.settings.pad_vocab})
        expected = flops_per_token(config) * row.tokens_per_sec / 1e12
        assert row.mfu == pytest.approx(expected)


def test_flops_per_token_matches_a_real_model():
    for pad in (False, True):
        config = TINY.model_copy(update={"pad_vocab": pad})
        assert flops_per_token(config) == build_model(config).flops_per_token()


# --- the largest micro-batch that fits ---------------------------------------------------------


def fits_up_to(limit: int, tried: list[int]):
    def attempt(batch: int) -> str:
        tried.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError(f"simulated: {batch} does not fit")
        return f"ran {batch}"

    return attempt


def test_largest_fitting_halves_until_a_batch_fits():
    tried: list[int] = []
    assert largest_fitting(fits_up_to(10, tried), 64) == (8, "ran 8")
    assert tried == [64, 32, 16, 8]


def test_largest_fitting_takes_the_cap_when_it_fits():
    tried: list[int] = []
    assert largest_fitting(fits_up_to(64, tried), 64) == (64, "ran 64")
    assert tried == [64]


def test_largest_fitting_raises_when_not_even_one_fits():
    tried: list[int] = []
    with pytest.raises(torch.OutOfMemoryError):
        largest_fitting(fits_up_to(0, tried), 8)
    assert tried == [8, 4, 2, 1]


def test_largest_fitting_does_not_swallow_other_errors():
    def broken(batch: int) -> None:
        raise RuntimeError("a bug, not a full GPU")

    with pytest.raises(RuntimeError, match="a bug"):
        largest_fitting(broken, 8)


@pytest.mark.slow
def test_rows_use_a_smaller_batch_when_the_cap_runs_out_of_memory():
    def step_that_fits_two(session: TrainingSession):
        if session.batches.batch_size > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        session.optimizer_step()

    rows = run_ladder(rows=CHEAP_ROWS[:2], max_batch=8, step_fn=step_that_fits_two)
    for row in rows:
        assert row.batch_size == 2
        assert row.tokens_per_sec == pytest.approx(2 * TINY.block_size / (row.ms_per_step / 1000))


# --- printing ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the ladder runs where there is CUDA")
def test_gpu_section_is_one_line_without_cuda(capsys):
    bench.bench_gpu(PROJECT_PARAMS.train)
    assert capsys.readouterr().out.strip() == "gpu: skipped (no CUDA device)"


def test_row_format_shows_gain_over_the_previous_row():
    first = LadderRow("fp32", Settings(), 8, 100.0, 1000.0, None)
    second = LadderRow("+ TF32", Settings(tf32=True), 8, 50.0, 2000.0, 0.4567)
    assert format_row(first, None).split() == ["fp32", "8", "100.0", "1,000", "n/a"]
    assert format_row(second, first).split() == ["+", "TF32", "8", "50.0", "2,000", "45.7%",
                                                 "2.00x"]


# --- the pipeline figures --------------------------------------------------------------------


@pytest.mark.slow
def test_training_and_sampling_figures_are_measured_and_printed(tmp_path, capsys,
                                                                tinyshakespeare):
    """The figures `make bench` prints, at a tiny size: every line it promises is there."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tinyshakespeare.read_text()[:60_000])
    params = PROJECT_PARAMS.model_copy(update={
        "model": PROJECT_PARAMS.model.model_copy(update=TINY_MODEL),
        "train": PROJECT_PARAMS.train.model_copy(update={**TINY_TRAIN, "max_iters": 4,
                                                         "eval_interval": 4,
                                                         "checkpoint_interval": 4}),
    })
    bench_main.bench_training(corpus, params, "params.yaml")
    out = capsys.readouterr().out
    assert out.startswith("\ntrain, params.yaml (2 layers") and "seeds 1337, 1, 2" in out
    rows = [line for line in out.splitlines() if "full-validation loss" in line]
    assert [row.split()[1] for row in rows] == ["float32", "auto"]
    assert all(re.search(r"[\d,]+ tokens/s \(median\)", row) for row in rows)

    folder = tmp_path / "trained"
    tokens_dir = write_tokens(folder, make_corpus(5_000))
    train(run_params(train_overrides={"max_iters": 2, "eval_interval": 2,
                                      "checkpoint_interval": 2}), paths_in(folder, tokens_dir))
    bench_main.bench_sampling(folder / "models")
    out = capsys.readouterr().out
    assert re.search(r"batch 1: +[\d,]+ tokens/s", out) and re.search(r"batch 8: +[\d,]+", out)


def test_the_parallel_tokenize_figure_comes_from_its_module(tmp_path):
    """`make bench` runs it in a process of its own, by module path."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(make_corpus(5_000), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "gptlab.bench.parallel_tokenize", "char",
                             str(corpus), str(tmp_path)], capture_output=True, text=True,
                            check=True)
    assert re.fullmatch(r"  char +\d+ MB, 1 workers: +[\d.]+ MB/s, peak \d+ MB per worker\n",
                        result.stdout)


def test_the_parallel_tokenize_module_imports_no_torch():
    """Its spawned workers import it: torch would slow their start as the tokenize stage's never
    is."""
    check = "import sys, gptlab.bench.parallel_tokenize; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


# --- GPT-2 (124M)'s shape on a CPU (gptlab.bench.gpt2_cpu), here at a tiny shape -----------------

TINY_GPT2 = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128}


@pytest.mark.parametrize("batch", [1, 3])
def test_the_gpt2_bench_gives_transformers_gptlabs_weights(batch):
    """Both sides generate the same greedy tokens: the table compares like with like."""
    config = gpt2_cpu.gpt2_config(**TINY_GPT2)
    ours, figures = gpt2_cpu.generation_figures(config, "gptlab", batch, torch.float32, 20, 30)
    theirs, _ = gpt2_cpu.generation_figures(config, "transformers", batch, torch.float32, 20, 30)
    assert ours.tokens == theirs.tokens
    assert len(ours.tokens) == batch and all(len(row) == 30 for row in ours.tokens)
    assert 0 < ours.prefill_seconds < ours.seconds
    assert figures["tokens_per_sec"] == pytest.approx(batch * 30 / ours.seconds)
    assert figures["decode_tokens_per_sec"] == pytest.approx(
        batch * 29 / (ours.seconds - ours.prefill_seconds))


def test_the_gpt2_bench_trains_the_same_weights_on_both_sides():
    config = gpt2_cpu.gpt2_config(**TINY_GPT2)
    padded_rows = config.padded_vocab_size - config.vocab_size  # gptlab's table only
    full = [gpt2_cpu.step_figures(config, impl, 0, 32, 1)["trainable"] for impl in gpt2_cpu.IMPLS]
    assert full[0] - full[1] == padded_rows * config.n_embd
    # Rank-8 adapters on attention's two projections, A (8 x in) and B (out x 8), each layer.
    lora = [gpt2_cpu.step_figures(config, impl, 8, 32, 1)["trainable"] for impl in gpt2_cpu.IMPLS]
    width = config.n_embd
    assert lora == [config.n_layer * 8 * ((width + 3 * width) + (width + width))] * 2


def test_a_missing_transformers_is_a_row_without_its_figures(capsys):
    figures = {"tokens_per_sec": 50.0, "decode_tokens_per_sec": 60.0, "peak_mb": 700.0}
    gpt2_cpu.print_row("generate, batch 1, float32", [figures, None], 80.0,
                       "decode_tokens_per_sec")
    gpt2_cpu.print_row("generate, batch 8, float32", [figures, {**figures, "peak_mb": 900.0,
                                                                "tokens_per_sec": 25.0}],
                       120.0, "decode_tokens_per_sec")
    missing, present = capsys.readouterr().out.splitlines()
    assert "(not installed)" in missing and missing.split()[-2:] == ["75%", "700"]
    assert present.split()[-7:] == ["25.0", "2.0x", "120.0", "50%", "700", "/", "900"]
