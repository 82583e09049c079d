"""Tests of gptlab.published: the published model round-trips exactly, the folder is swapped in
whole, and loading rejects anything but safetensors + JSON without running its code."""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import model_config
from safetensors.torch import save_file
from torch import nn

from gptlab.errors import GptlabError
from gptlab.io import sha256_file
from gptlab.model import build_model
from gptlab.params import ModelConfig
from gptlab.published import FORMAT, load_published, save_published
from gptlab.tokenizers import CharTokenizer

CHARS = "abc"
# A fixed prompt of valid ids for the 3-character vocabulary, shorter than block_size.
PROMPT = torch.tensor([[0, 1, 2, 2, 1, 0], [2, 2, 0, 1, 0, 1]])
SUMMARY = {"step": 7, "seed": 1337, "val_loss": 1.0625, "torch_version": torch.__version__}


def tiny_config(**overrides: Any) -> ModelConfig:
    return model_config(**{"vocab_size": len(CHARS), "n_layer": 1, "n_head": 2, "n_embd": 32,
                           "block_size": 8, **overrides})


def tiny_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config).eval()


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    # Kept in its own folder so the models folder's parent holds nothing but the models folder.
    path = tmp_path / "tokens" / "tokenizer.json"
    path.parent.mkdir()
    CharTokenizer(CHARS).save(path)
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "models"


def publish(config: ModelConfig, tokenizer_file: Path, models_dir: Path,
            seed: int = 0) -> nn.Module:
    model = tiny_model(config, seed)
    save_published(model, config, tokenizer_file, SUMMARY, models_dir)
    return model


def rewrite_model_config(models_dir: Path, **changes: Any) -> None:
    """Edit config.json's model section in place, as a hand edit or a stale file would."""
    path = models_dir / "config.json"
    saved = json.loads(path.read_text())
    saved["model"].update(changes)
    path.write_text(json.dumps(saved))


def file_error(path: Path, words: str) -> str:
    """A pytest.raises pattern: the message names `path` and then says `words`."""
    return re.escape(str(path)) + ".*" + re.escape(words)


def assert_same_state_dict(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


# --- published weights -------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = {
    "gpt-tied-learned": tiny_config(tie_weights=True, pos="learned"),
    "gpt-untied-learned": tiny_config(tie_weights=False, pos="learned"),
    "gpt-tied-rope": tiny_config(tie_weights=True, pos="rope"),
    "gpt-untied-rope": tiny_config(tie_weights=False, pos="rope"),
    "bigram": tiny_config(arch="bigram"),
}


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS.values(), ids=ROUND_TRIP_CONFIGS.keys())
def test_published_model_round_trips_to_identical_logits(config, tokenizer_file, models_dir):
    original = publish(config, tokenizer_file, models_dir)
    # Build the loaded model under another seed: only the file can make the weights agree.
    torch.manual_seed(12345)
    published = load_published(models_dir)
    loaded = published.model

    assert isinstance(loaded, type(original))
    assert loaded.config == config == published.config.model
    assert published.tokenizer.vocab_size == len(CHARS) and published.device.type == "cpu"
    assert_same_state_dict(original, loaded)
    loaded.eval()
    with torch.no_grad():
        expected, _ = original(PROMPT)
        actual, _ = loaded(PROMPT)
    assert torch.equal(actual, expected)
    if config.arch == "gpt":
        # Loading copies into the tied table; it must not leave the head a separate tensor.
        tied = loaded.lm_head.weight is loaded.tok_emb.weight
        assert tied == config.tie_weights


def test_config_json_describes_model_tokenizer_and_training(tokenizer_file, models_dir):
    config = tiny_config(n_layer=2, pos="rope", norm="rmsnorm", mlp="swiglu")
    publish(config, tokenizer_file, models_dir)

    saved = json.loads((models_dir / "config.json").read_text())
    assert saved == {
        "format": FORMAT,
        "model": config.model_dump(),
        "tokenizer": {"kind": "char", "vocab_size": len(CHARS), "file": "tokenizer.json",
                      "chat_tokens": None},
        "training": SUMMARY,
        "sha256": {name: sha256_file(models_dir / name)
                   for name in ("model.safetensors", "tokenizer.json")},
    }
    assert saved["model"]["vocab_size"] == len(CHARS)
    # The folder alone is enough to sample from: the tokenizer is copied, byte for byte.
    assert (models_dir / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert load_published(models_dir).config.model_dump() == saved


def test_models_folder_holds_exactly_the_three_files(tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    assert sorted(p.name for p in models_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json",
    ]
    # No staging or ".old" folders are left beside it.
    assert [p.name for p in models_dir.parent.iterdir()] == ["models"]


def test_save_published_replaces_an_existing_folder_whole(tokenizer_file, models_dir):
    models_dir.mkdir(parents=True)
    (models_dir / "stale.bin").write_text("from an older run")
    (models_dir / "config.json").write_text("{}")

    model = publish(tiny_config(), tokenizer_file, models_dir, seed=1)

    assert sorted(p.name for p in models_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json",
    ]
    assert [p.name for p in models_dir.parent.iterdir()] == ["models"]
    assert_same_state_dict(model, load_published(models_dir).model)


def test_failed_save_published_leaves_the_previous_folder_untouched(tmp_path, tokenizer_file,
                                                                    models_dir):
    first = publish(tiny_config(), tokenizer_file, models_dir, seed=1)
    before = {p.name: p.read_bytes() for p in models_dir.iterdir()}

    # The tokenizer is read after the weights are staged: the failure comes mid-save.
    with pytest.raises(FileNotFoundError):
        save_published(tiny_model(tiny_config(), seed=2), tiny_config(),
                       tmp_path / "missing.json", SUMMARY, models_dir)

    assert {p.name: p.read_bytes() for p in models_dir.iterdir()} == before
    assert [p.name for p in models_dir.parent.iterdir()] == ["models"]
    assert_same_state_dict(first, load_published(models_dir).model)


# --- loading never unpickles -------------------------------------------------------------------


class Evil:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_torch_pickle(path: Path) -> None:
    torch.save({"tok_emb.weight": torch.zeros(64, 32)}, path)


def write_random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def write_truncated_safetensors(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [write_torch_pickle, write_random_bytes,
                                     write_truncated_safetensors, write_truncated_header,
                                     write_empty])
def test_weights_that_are_not_safetensors_are_refused(corrupt, tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    weights = models_dir / "model.safetensors"
    corrupt(weights)
    with pytest.raises(GptlabError, match=file_error(weights, "not a safetensors")):
        load_published(models_dir)


def dump_plain_pickle(payload: Evil, path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(payload, f)


def dump_torch_save(payload: Evil, path: Path) -> None:
    torch.save({"model": payload}, path)


@pytest.mark.parametrize("dump", [dump_plain_pickle, dump_torch_save])
def test_loading_a_malicious_pickle_runs_no_code(dump, tmp_path, tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    weights = models_dir / "model.safetensors"
    marker = tmp_path / "pwned"
    dump(Evil(marker), weights)

    with pytest.raises(GptlabError, match=file_error(weights, "not a safetensors")):
        load_published(models_dir)
    assert not marker.exists()

    # Control: the payload is live, so its absence above really means nothing was unpickled.
    if dump is dump_plain_pickle:
        pickle.loads(weights.read_bytes()).close()
    else:
        # Under another name: torch.load hands *.safetensors files to safetensors.
        copy = weights.rename(tmp_path / "payload.pt")
        torch.load(copy, weights_only=False)["model"].close()
    assert marker.exists()


# --- loading a mismatched or incomplete folder -------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_missing_file_is_not_found(tokenizer_file, models_dir, name):
    publish(tiny_config(), tokenizer_file, models_dir)
    missing = models_dir / name
    missing.unlink()
    with pytest.raises(GptlabError, match=file_error(missing, "not found")):
        load_published(models_dir)


def test_missing_models_folder_is_not_found(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_published(tmp_path / "models")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '"model"', '{"format": 1}'],
                         ids=["invalid-json", "empty", "list", "string", "no-model-section"])
def test_config_that_is_not_a_model_config_is_refused(text, tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    config = models_dir / "config.json"
    config.write_text(text)
    with pytest.raises(GptlabError, match=file_error(config, "not a gptlab model config")):
        load_published(models_dir)


@pytest.mark.parametrize("edit", [
    lambda model: model.update(n_embed=32),  # a misspelt key
    lambda model: model.pop("vocab_size"),  # a required key gone
    lambda model: model.update(arch="lstm"),  # a value GPTConfig does not know
    lambda model: model.update(n_head=3),  # does not divide n_embd
], ids=["unknown-key", "missing-key", "bad-arch", "bad-n-head"])
def test_config_with_wrong_or_missing_keys_is_refused(edit, tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    config = models_dir / "config.json"
    saved = json.loads(config.read_text())
    edit(saved["model"])
    config.write_text(json.dumps(saved))
    with pytest.raises(GptlabError, match=file_error(config, "not a gptlab model config")):
        load_published(models_dir)


MISMATCHES = {
    # Same names, other shapes: torch's size-mismatch error must become a GptlabError.
    "wider": ({"n_embd": 32}, {"n_embd": 64}),
    "more-vocab": ({}, {"vocab_size": 100}),  # pads to 128 rows instead of 64
    # Other names: keys missing from or unexpected in the file.
    "deeper": ({"n_layer": 1}, {"n_layer": 2}),
    "shallower": ({"n_layer": 2}, {"n_layer": 1}),
    "untied-file-tied-config": ({"tie_weights": False}, {"tie_weights": True}),
    "tied-file-untied-config": ({"tie_weights": True}, {"tie_weights": False}),
    "rope-file-learned-config": ({"pos": "rope"}, {"pos": "learned"}),
    "gpt-file-bigram-config": ({}, {"arch": "bigram"}),
}


@pytest.mark.parametrize(("saved_as", "config_says"), MISMATCHES.values(), ids=MISMATCHES.keys())
def test_weights_from_another_config_do_not_match(saved_as, config_says, tokenizer_file,
                                                  models_dir):
    publish(tiny_config(**saved_as), tokenizer_file, models_dir)
    rewrite_model_config(models_dir, **config_says)
    weights, config = models_dir / "model.safetensors", models_dir / "config.json"
    pattern = file_error(weights, "does not match") + ".*" + re.escape(str(config))
    with pytest.raises(GptlabError, match=pattern):
        load_published(models_dir)


def test_weights_with_a_renamed_tensor_do_not_match(tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    # Right shapes, but one tensor under a name the model does not have: missing + unexpected.
    state = tiny_model(tiny_config()).state_dict()
    state["final_norm.gain"] = state.pop("final_norm.weight")
    del state["lm_head.weight"]  # tied: the file holds the table once, as save_model writes it
    weights = models_dir / "model.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(weights))
    with pytest.raises(GptlabError, match=file_error(weights, "does not match")):
        load_published(models_dir)


def test_checkpoint_files_are_plain_files_with_normal_permissions(tmp_path, tokenizer_file):
    # atomic_dir starts from mkdtemp (mode 0700); the swapped-in folders must not stay private.
    models_dir = tmp_path / "models"
    publish(tiny_config(), tokenizer_file, models_dir)
    umask = os.umask(0)
    os.umask(umask)
    assert models_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in models_dir.iterdir():
        assert path.is_file() and not path.is_symlink()



def test_a_tokenizer_of_another_vocabulary_is_refused(tokenizer_file, models_dir):
    publish(tiny_config(), tokenizer_file, models_dir)
    CharTokenizer("abcd").save(models_dir / "tokenizer.json")
    with pytest.raises(GptlabError, match=file_error(models_dir / "tokenizer.json",
                                                     "4 tokens, but the model was trained on 3")):
        load_published(models_dir)


# --- damaged files and readers while a new model is published ---------------------------------


def flip_a_weight_bit(data: bytes) -> bytes:
    return data[:-2] + bytes([data[-2] ^ 0x01]) + data[-1:]


def add_a_space(data: bytes) -> bytes:
    return data + b" "


# Each damage leaves a well-formed file: only the recorded sha256 can tell.
@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", flip_a_weight_bit),
                                              ("tokenizer.json", add_a_space)])
def test_a_damaged_file_is_named_not_served(tokenizer_file, models_dir, name, damage):
    publish(tiny_config(), tokenizer_file, models_dir)
    path = models_dir / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(GptlabError, match=file_error(path, "damaged")):
        load_published(models_dir)


def test_a_folder_written_before_hashes_were_recorded_still_loads(tokenizer_file, models_dir):
    model = publish(tiny_config(), tokenizer_file, models_dir)
    config = models_dir / "config.json"
    saved = json.loads(config.read_text())
    del saved["sha256"]
    config.write_text(json.dumps(saved))
    assert_same_state_dict(model, load_published(models_dir).model)


@pytest.mark.slow
def test_readers_never_mix_two_published_models(tokenizer_file, models_dir):
    """Readers in threads load the folder while it is republished, again and again, with models
    of another shape each time: each load is one whole model, never one's config with another's
    weights."""
    configs = [tiny_config(n_embd=32), tiny_config(n_embd=64, n_layer=2)]
    models = [tiny_model(config, seed) for seed, config in enumerate(configs)]
    publish(configs[0], tokenizer_file, models_dir)
    loads, failures, stop = [], [], threading.Event()
    reads = [0, 0, 0]  # whole models loaded, by reader

    def read(reader: int) -> None:
        while not stop.is_set():
            try:
                published = load_published(models_dir)
                which = configs.index(published.model.config)
                assert_same_state_dict(models[which], published.model)
            except (GptlabError, ValueError, AssertionError) as error:
                failures.append(repr(error))  # anything but a whole model is a failure
                return
            loads.append(which)
            reads[reader] += 1

    readers = [threading.Thread(target=read, args=(reader,)) for reader in range(len(reads))]
    for reader in readers:
        reader.start()
    start = time.monotonic()
    publishes = 0
    while (time.monotonic() < start + 4 or publishes < 20) and time.monotonic() < start + 60:
        which = (publishes + 1) % 2
        before = list(reads)
        save_published(models[which], configs[which], tokenizer_file, SUMMARY, models_dir)
        publishes += 1
        # Every reader loads once before the next publish, so each read meets at most two:
        # on a machine busy with other work, reads would otherwise fall behind the writer.
        while (not failures and time.monotonic() < start + 60
               and any(now == then for now, then in zip(reads, before, strict=True))):
            time.sleep(0.001)
        if failures:
            break
    stop.set()
    for reader in readers:
        reader.join(timeout=30)
    assert not failures
    assert publishes >= 20 and set(loads) == {0, 1}
