"""The presets: GPT-2 (124M) with GPT-2's recipe and its first step on CPU, fine-tuning as
nanoGPT does, the CPU speedrun on nanoGPT's data and split (nanoGPT's own recipe beside it is
checked in test_speedrun), each a whole params file."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINYSHAKESPEARE, paths_in, run_stage, write_params, write_tokens

from gptlab.optim import learning_rate
from gptlab.params import ModelConfig, RunParams, load_params
from gptlab.pretrained import refuse_another_shape
from gptlab.train import train

PRESET = ROOT / "src" / "gptlab" / "presets" / "gpt2-124m.yaml"


@pytest.fixture(scope="module")
def preset():
    return load_params(PRESET)


def test_the_preset_is_gpt2_small_with_its_recipe(preset):
    m, t = preset.model, preset.train
    # GPT-2 small's shape as the model table names it, with nanoGPT's exact GELU, from scratch.
    gpt2 = ModelConfig.from_name("gpt2", mlp="gelu")
    assert ModelConfig.of(m, gpt2.vocab_size) == gpt2 and m.init == "scratch"
    assert (preset.tokenizer.kind, preset.tokenizer.encoding) == ("tiktoken", "gpt2")
    assert t.batch_size * t.grad_accum * m.block_size == 524_288
    assert (t.lr, t.warmup_iters, t.weight_decay) == (6e-4, 715, 0.1)
    assert t.min_lr == pytest.approx(0.1 * t.lr)
    assert learning_rate(714, t) == pytest.approx(t.lr, rel=2e-3)
    assert learning_rate(t.max_iters, t) == pytest.approx(t.min_lr)
    assert (t.dtype, t.compile) == ("bfloat16", True)
    assert preset.data.source == "hf" and preset.data.sha256 is None
    # Runs unchanged on 1, 2, 4 or 8 GPUs: each does grad_accum / nproc micro-batches.
    assert all(t.grad_accum % n == 0 for n in (1, 2, 4, 8))


@pytest.mark.slow
def test_the_preset_trains_its_first_step_on_cpu_at_a_tiny_batch(preset, tmp_path: Path):
    """GPT-2 small's twelve blocks (12 x 768, block 1024), one sequence, one step. The tokens
    are characters: a 100K-token vocabulary would triple the step's time and test nothing more
    here (the tiktoken tokenizer has its own tests)."""
    text = (ROOT / "tests" / "helpers.py").read_text() * 20  # a few thousand tokens of text
    tokens_dir = write_tokens(tmp_path, text)
    tiny = preset.train.model_copy(update={
        "device": "cpu", "dtype": "auto", "compile": False, "batch_size": 1, "grad_accum": 1,
        "max_iters": 1, "eval_iters": 1, "log_interval": 1})
    metrics = train(RunParams(preset.seed, preset.model, tiny), paths_in(tmp_path, tokens_dir))
    vocab_size = len(set(text))
    # GPT-2 small's 85M parameters besides the (tied) token embedding, padded to 64 rows.
    token_embedding = math.ceil(vocab_size / 64) * 64 * preset.model.n_embd
    assert metrics["parameters"] - token_embedding == pytest.approx(85e6, rel=0.01)
    # Freshly initialised, the loss is that of a uniform guess over the vocabulary.
    assert abs(metrics["final_train_loss"] - math.log(vocab_size)) < 1.0
    assert math.isfinite(metrics["final_val_loss"])


FINETUNE = ROOT / "src" / "gptlab" / "presets" / "finetune-shakespeare.yaml"


def test_the_finetune_preset_is_nanogpts_finetune_shakespeare_on_gpt2s_shape():
    """GPT-2's weights are downloaded at first use: the test checks the preset's model section
    against the model table's GPT-2 small (itself checked against transformers' GPT-2 small in
    test_pretrained) instead."""
    preset = load_params(FINETUNE)
    default = load_params(ROOT / "params.yaml")
    assert preset.data == default.data  # the default Shakespeare corpus
    assert (preset.tokenizer.kind, preset.tokenizer.encoding) == ("tiktoken", "gpt2")
    assert preset.model.init == "gpt2"
    gpt2 = ModelConfig.from_name("gpt2")
    refuse_another_shape(ModelConfig.of(preset.model, gpt2.vocab_size), gpt2, "gpt2")
    t = preset.train
    assert {learning_rate(step, t) for step in range(t.max_iters)} == {3e-5}  # constant
    assert (t.batch_size * t.grad_accum, t.max_iters) == (32, 20)


SPEEDRUN = ROOT / "src" / "gptlab" / "presets" / "speedrun-cpu.yaml"


def test_the_speedrun_preset_splits_nanogpts_text_as_nanogpt_does(tmp_path):
    """The record is defined on nanoGPT's data and split: the preset's download is the file
    nanoGPT's shakespeare_char reads (its sha256), and its clean stage splits it at
    int(0.9 * n) characters, as nanoGPT's prepare.py does, changing nothing."""
    preset = yaml.safe_load(SPEEDRUN.read_text())
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")
    assert hashlib.sha256(TINYSHAKESPEARE.read_bytes()).hexdigest() == preset["data"]["sha256"]
    assert preset["data"]["spec"].endswith("/char-rnn/master/data/tinyshakespeare/input.txt")
    # The same file from this machine instead of the internet: the rest of the preset as is.
    preset["data"].update(source="local", spec=str(TINYSHAKESPEARE))
    write_params(tmp_path, preset)
    for stage in ("download", "clean"):
        result = run_stage(stage, tmp_path)
        assert result.returncode == 0, result.stderr
    cut = int(0.9 * len(text))
    clean = tmp_path / "data" / "clean"
    assert (clean / "train.txt").read_text(encoding="utf-8") == text[:cut]
    assert (clean / "val.txt").read_text(encoding="utf-8") == text[cut:]


def test_the_speedrun_preset_trains_nanogpts_shape_with_the_speedruns_components():
    preset = load_params(SPEEDRUN)
    default = load_params(ROOT / "params.yaml")
    m, t = preset.model, preset.train
    shape = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pos", "norm")
    assert {key: getattr(m, key) for key in shape} == {
        key: getattr(default.model, key) for key in shape}  # nanoGPT's CPU model
    assert (m.mlp, m.qk_norm, m.proj_init, m.tie_weights) == ("gelu", True, "zero", False)
    assert (t.optimizer, t.schedule) == ("muon", "wsd")
    assert learning_rate(t.max_iters - 1, t) > 0 and learning_rate(t.max_iters, t) == 0
    # Scored as the record is: every validation token, in 64-token windows, in float32.
    assert (preset.eval.context, preset.eval.dtype) == (64, "float32")
    assert preset.tokenizer.kind == "char" and preset.clean.split == "tail"


@pytest.mark.parametrize("preset", sorted((ROOT / "src" / "gptlab" / "presets").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_each_preset_is_a_whole_params_file(preset):
    """`cp PRESET params.yaml` must give a project whose every key is set: a preset missing a
    key would train with whatever the schema's default is at the time."""
    raw = yaml.safe_load(preset.read_text())
    default = yaml.safe_load((ROOT / "params.yaml").read_text())

    def keys(section: dict, prefix: str = "") -> set[str]:
        return {f"{prefix}{key}" for key in section} | {
            name for key, value in section.items() if isinstance(value, dict)
            for name in keys(value, f"{prefix}{key}.")}

    assert keys(raw) == keys(default)
    load_params(preset)  # and valid
