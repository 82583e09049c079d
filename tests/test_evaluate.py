"""Evaluation: exact scores against a brute-force reference, bits per byte, the train sample,
determinism, errors naming the bad file, and the stage end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    PROJECT_PARAMS,
    make_corpus,
    model_config,
    paths_in,
    run_params,
    run_stage,
    write_params,
    write_tokens,
)

from gptlab.encode import encode_file
from gptlab.errors import GptlabError
from gptlab.evaluate import evaluate_model, evaluate_tokens, train_sample
from gptlab.model import build_model
from gptlab.published import load_published, save_published
from gptlab.tokenizers import CharTokenizer
from gptlab.tokens import open_split, read_header, read_meta
from gptlab.train import train

CPU = torch.device("cpu")
BLOCK = 8
EVAL = PROJECT_PARAMS.eval.model_copy(update={"device": "cpu", "dtype": "float32",
                                              "batch_size": 8, "train_split": False,
                                              "train_tokens": 2000})
VAL_KEYS = {"val_loss", "perplexity", "bits_per_byte", "tokens", "bytes", "tokens_per_sec"}
TRAIN_KEYS = {"train_loss", "train_perplexity", "train_bits_per_byte", "train_tokens",
              "train_bytes"}


def random_model(arch: str, vocab_size: int = 11) -> torch.nn.Module:
    """A tiny model with large random weights, so that every token's loss is different."""
    torch.manual_seed(0)
    model = build_model(model_config(vocab_size=vocab_size, arch=arch, n_layer=2, n_head=2,
                                     n_embd=16, block_size=BLOCK))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


@torch.no_grad()
def reference_nats(model: torch.nn.Module, tokens: np.ndarray) -> float:
    """Cross-entropy summed one target at a time over consecutive windows of BLOCK tokens."""
    model.eval()
    total = 0.0
    for start in range(0, len(tokens) - 1, BLOCK):
        window = torch.from_numpy(tokens[start : start + BLOCK + 1].astype(np.int64))
        logits, _ = model(window[None, :-1])
        for position, target in enumerate(window[1:]):
            total += F.cross_entropy(logits[0, position].double(), target).item()
    return total


def make_project(folder: Path, text: str) -> Path:
    """data/tokens of `text` and an untrained tiny model in models/, under `folder`."""
    tokens_dir = write_tokens(folder, text)
    vocab_size = CharTokenizer(text).vocab_size
    config = model_config(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=BLOCK)
    save_published(build_model(config), config, tokens_dir / "tokenizer.json", {},
                   folder / "models")
    return folder


def evaluate_in(project: Path, **overrides) -> dict:
    return evaluate_model(project / "models", project / "data" / "tokens",
                          EVAL.model_copy(update=overrides))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("untrained"), make_corpus(3000))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained on pseudo-English whose val split is random characters, so the
    model is clearly better on train than on val."""
    folder = tmp_path_factory.mktemp("trained")
    words = make_corpus(27_000)
    alphabet = sorted(set(words))
    rng = np.random.default_rng(0)
    tokens_dir = write_tokens(folder, words + "".join(rng.choice(alphabet, 3000)))
    train(run_params(), paths_in(folder, tokens_dir))
    return folder


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
@pytest.mark.parametrize("length", [4 * BLOCK + 1, 4 * BLOCK + 4, 5, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_every_token_but_the_first_once(arch, length, batch_size):
    model = random_model(arch)
    tokens = np.random.default_rng(length).integers(0, 11, length).astype(np.uint16)
    score = evaluate_tokens(model, [tokens], BLOCK, batch_size, CPU, torch.float32)
    assert score.tokens == length - 1
    assert score.nats == pytest.approx(reference_nats(model, tokens), rel=1e-5)
    assert score.loss == pytest.approx(score.nats / (length - 1))


def test_score_does_not_depend_on_batch_size():
    model = random_model("gpt")
    tokens = np.random.default_rng(0).integers(0, 11, 10 * BLOCK + 3).astype(np.uint16)
    scores = [evaluate_tokens(model, [tokens], BLOCK, batch_size, CPU, torch.float32).nats
              for batch_size in (1, 4, 64)]
    assert scores == pytest.approx([scores[0]] * 3, rel=1e-6)


def test_mixed_precision_scores_close_to_float32():
    model = random_model("gpt")
    tokens = np.random.default_rng(0).integers(0, 11, 10 * BLOCK + 3).astype(np.uint16)
    exact, mixed = (evaluate_tokens(model, [tokens], BLOCK, 4, CPU, dtype).nats
                    for dtype in (torch.float32, torch.bfloat16))
    assert mixed == pytest.approx(exact, rel=1e-2)


def test_train_sample_is_evenly_spread_whole_windows():
    tokens = np.arange(10_000)
    sample = train_sample([tokens], 1000, 15)
    assert sample.shape == (1000 // 16, 16)
    assert (sample == sample[:, :1] + np.arange(16)).all()  # each row is consecutive tokens
    assert sample[0, 0] == 0 and sample[-1, -1] == 9999  # from the start to the end
    gaps = np.diff(sample[:, 0])
    assert gaps.min() >= 16 and gaps.max() - gaps.min() <= 1  # no overlap, even spacing
    assert np.array_equal(sample, train_sample([tokens], 1000, 15))


def test_train_sample_never_overlaps_however_many_tokens_are_asked_for():
    sample = train_sample([np.arange(100)], 10**6, 15)
    assert sample.shape == (6, 16) and len(np.unique(sample)) == sample.size
    assert np.array_equal(train_sample([np.arange(5)], 100, 15), np.arange(5)[None])


def test_metrics_of_ascii_char_tokens(untrained):
    metrics = evaluate_in(untrained)
    assert set(metrics) == VAL_KEYS
    val_tokens = read_header(untrained / "data" / "tokens" / "val_000000.bin").count
    assert metrics["tokens"] == metrics["bytes"] == val_tokens - 1
    assert metrics["bits_per_byte"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    assert metrics["tokens_per_sec"] > 0


def test_bits_per_byte_counts_utf8_bytes_not_characters(tmp_path):
    project = make_project(tmp_path, make_corpus(3000).replace("e", "é"))
    metrics = evaluate_in(project)
    assert metrics["bytes"] > metrics["tokens"]
    assert metrics["bits_per_byte"] == pytest.approx(
        metrics["val_loss"] / math.log(2) * metrics["tokens"] / metrics["bytes"], rel=1e-3)


def test_evaluation_is_deterministic(untrained):
    first, second = evaluate_in(untrained), evaluate_in(untrained)
    del first["tokens_per_sec"], second["tokens_per_sec"]
    assert first == second


def test_a_fixed_context_scores_windows_of_that_length(trained):
    """eval.context: the split cut into windows of that many tokens, whatever the model's
    block size; null keeps the block size. Shorter windows give each token less context, so
    the trained model scores worse on text it learned (the train split; its val split is
    random characters, where context is no help)."""
    tokens_dir = trained / "data" / "tokens"
    tokens = open_split(tokens_dir, "val", read_meta(tokens_dir, ["val_tokens", "val_shards"]))
    published = load_published(trained / "models", CPU)
    block_size = published.config.model.block_size
    for context in (block_size, block_size // 2, 3):
        expected = evaluate_tokens(published.model, tokens, context, 8, CPU, torch.float32)
        metrics = evaluate_in(trained, context=context)
        assert metrics["val_loss"] == pytest.approx(expected.loss, abs=1e-6), context
        assert metrics["tokens"] == expected.tokens
    assert evaluate_in(trained, context=None)["val_loss"] == evaluate_in(
        trained, context=block_size)["val_loss"]
    short, full = (evaluate_in(trained, context=context, train_split=True)["train_loss"]
                   for context in (3, None))
    assert short > full
    with pytest.raises(GptlabError, match=rf"^eval.context: {block_size + 1} tokens is longer "
                                          rf"than the model's block_size \({block_size}\)"):
        evaluate_in(trained, context=block_size + 1)


def test_train_split_shows_the_overfitting_gap(trained):
    first = evaluate_in(trained, train_split=True)
    assert set(first) == VAL_KEYS | TRAIN_KEYS
    assert first["train_loss"] < first["val_loss"]
    assert 0 < first["train_tokens"] <= EVAL.train_tokens
    second = evaluate_in(trained, train_split=True)
    assert {k: v for k, v in first.items() if k != "tokens_per_sec"} == {
        k: v for k, v in second.items() if k != "tokens_per_sec"}


def write_meta_without_val_bytes(project: Path) -> None:
    meta_path = project / "data" / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["val_bytes"]
    meta_path.write_text(json.dumps(meta))


def miscount_val_tokens_in_meta(project: Path) -> None:
    meta_path = project / "data" / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["val_tokens"] += 1
    meta_path.write_text(json.dumps(meta))


def record_another_tokenizer_in_meta(project: Path) -> None:
    meta_path = project / "data" / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_fingerprint"] = CharTokenizer("xyz").fingerprint
    meta_path.write_text(json.dumps(meta))


def encode_val_with_another_tokenizer(project: Path) -> None:
    tokenizer = CharTokenizer(make_corpus(3000) + "Z")
    encode_file(tokenizer, project / "val.txt", project / "data" / "tokens", "val", 10**6)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p / "models" / "config.json").unlink(), r"models/config\.json: not found"),
    (lambda p: (p / "models" / "model.safetensors").write_bytes(b"garbage"),
     r"models/model\.safetensors: not a safetensors"),
    (lambda p: (p / "data" / "tokens" / "meta.json").unlink(), r"meta\.json: not found"),
    (write_meta_without_val_bytes, r"meta\.json: missing .*val_bytes"),
    (miscount_val_tokens_in_meta, r"val_\*\.bin: the shards hold \d+ tokens but .*meta\.json says"),
    (lambda p: (p / "data" / "tokens" / "val_000000.bin").unlink(), r"val_000000\.bin: not found"),
    (lambda p: (p / "data" / "tokens" / "val_000000.bin").write_bytes(b"hello"),
     r"val_000000\.bin: not a gptlab token file"),
    (encode_val_with_another_tokenizer, r"val_000000\.bin: written by another tokenizer"),
    (record_another_tokenizer_in_meta, r"meta\.json: tokens of another tokenizer than the "
                                       r"model in .*models was trained with"),
])
def test_bad_inputs_name_the_file(untrained, tmp_path, damage, message):
    project = tmp_path / "project"
    shutil.copytree(untrained, project)
    damage(project)
    with pytest.raises(GptlabError, match=message):
        evaluate_in(project)


@pytest.fixture
def stage_project(trained, tmp_path, params_for) -> Path:
    project = tmp_path / "project"
    shutil.copytree(trained, project)
    write_params(project, params_for({"eval.device": "cpu", "eval.batch_size": 8,
                                      "eval.train_split": True, "eval.train_tokens": 2000}))
    return project


@pytest.mark.slow
def test_stage_writes_metrics(stage_project):
    result = run_stage("evaluate", stage_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((stage_project / "metrics" / "eval.json").read_text())
    assert set(metrics) == VAL_KEYS | TRAIN_KEYS
    assert f"val_loss={metrics['val_loss']}" in result.stdout


@pytest.mark.parametrize(("damage", "named"), [
    (lambda p: shutil.rmtree(p / "models"), "models/config.json"),
    (record_another_tokenizer_in_meta, "data/tokens/meta.json"),
])
@pytest.mark.slow
def test_stage_refuses_bad_inputs_in_one_line(stage_project, damage, named):
    damage(stage_project)
    result = run_stage("evaluate", stage_project)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (stage_project / "metrics" / "eval.json").exists()
