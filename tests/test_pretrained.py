"""Tests of gptlab.pretrained: a GPT-2 saved by transformers, converted, computes what
transformers computes, token for token; anything but GPT-2 is refused in one line; the Hub
download is pinned and checked (with the Hub itself stood in for: no test needs the internet)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab import pretrained
from gptlab.errors import GptlabError
from gptlab.generate import generate
from gptlab.io import sha256_file
from gptlab.model import build_model
from gptlab.params import ModelConfig
from gptlab.pretrained import (
    HF_CONFIG,
    HF_WEIGHTS,
    HUB_GPT2,
    check_sha256,
    convert_gpt2,
    fetch_gpt2,
    gpt2_config,
    init_source,
    initial_weights,
    listed_sha256,
)

TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 100}
# The keys the Hub's openai-community/gpt2 config.json holds: the rest take GPT2Config's
# defaults.
HUB_CONFIG_KEYS = {"activation_function", "architectures", "attn_pdrop", "embd_pdrop",
                   "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd",
                   "n_head", "n_layer", "n_positions", "resid_pdrop", "vocab_size"}
PROMPT = [[5, 17, 42, 99, 0, 63, 8, 21], [1, 2, 3, 4, 5, 6, 7, 8]]


def tiny_gpt2(seed: int = 0, **config: Any) -> GPT2LMHeadModel:
    """A GPT-2 of random weights large enough that an approximate GELU would show."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, "bos_token_id": None,
                                          "eos_token_id": None, **config}))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


def save_as_hub(model: GPT2LMHeadModel, folder: Path) -> Path:
    """`model` as the Hub stores OpenAI's GPT-2s: tensors without `transformer.`, and a
    config.json of a few keys."""
    model.save_pretrained(folder)
    weights = load_file(folder / HF_WEIGHTS)
    save_file({name.removeprefix("transformer."): tensor for name, tensor in weights.items()},
              folder / HF_WEIGHTS, metadata={"format": "pt"})
    hf = json.loads((folder / HF_CONFIG).read_text())
    (folder / HF_CONFIG).write_text(json.dumps({k: v for k, v in hf.items() if k in HUB_CONFIG_KEYS}
                                            | {"n_ctx": hf["n_positions"]}))
    return folder


@pytest.fixture(scope="module")
def reference() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(scope="module", params=["save_pretrained", "hub"])
def checkpoint(request, reference, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "hub":
        return save_as_hub(reference, folder)
    reference.save_pretrained(folder)
    return folder


@pytest.fixture
def converted(checkpoint) -> torch.nn.Module:
    config, state = convert_gpt2(checkpoint)
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval()


def test_the_config_is_gpt2s(checkpoint):
    config, _ = convert_gpt2(checkpoint, dropout=0.1)
    assert config.model_dump() == {
        "arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
        "dropout": 0.1, "bias": True, "tie_weights": True, "pos": "learned",
        "norm": "layernorm", "mlp": "gelu_tanh", "vocab_size": 100, "pad_vocab": True,
        "qk_norm": False, "logit_softcap": None, "proj_init": "scaled"}


def test_the_named_gpt2_is_transformers_gpt2_small(tmp_path):
    GPT2Config().save_pretrained(tmp_path)  # transformers' defaults are GPT-2 small's
    assert ModelConfig.from_name("gpt2") == gpt2_config(tmp_path)


def test_an_unknown_model_name_is_refused_with_the_known_ones():
    with pytest.raises(GptlabError, match=r"unknown model 'gpt3'; expected one of \['gpt2'\]"):
        ModelConfig.from_name("gpt3")


def test_the_converted_model_computes_transformers_logits(converted, reference):
    idx = torch.tensor(PROMPT)
    with torch.no_grad():
        ours, _ = converted(idx)
        theirs = reference(idx).logits
    assert theirs.abs().max() > 0.5  # weights that let a wrong activation show
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_the_converted_model_generates_transformers_greedy_tokens(converted, reference):
    prompt = PROMPT[0]
    ours = generate(converted, prompt, num_samples=1, max_new_tokens=20, temperature=1.0,
                    top_k=None, top_p=1.0, greedy=True, eot_id=None,
                    generator=torch.Generator().manual_seed(0))[0]
    ids = torch.tensor([prompt])
    # The mask given: transformers would take the prompt's id 0, its pad id here, for padding.
    theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=20, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 1  # a continuation, not one token over and over


def test_the_vocabulary_is_padded_with_zero_rows_and_tied(checkpoint, reference):
    config, state = convert_gpt2(checkpoint)
    table = state["tok_emb.weight"]
    assert table.shape == (config.padded_vocab_size, 32) == (128, 32)
    torch.testing.assert_close(table[:100], reference.transformer.wte.weight, rtol=0, atol=0)
    assert not table[100:].any()
    assert state["lm_head.weight"] is table


def test_the_exact_gelu_converts_to_gelu(tmp_path):
    tiny_gpt2(activation_function="gelu").save_pretrained(tmp_path)
    config, _ = convert_gpt2(tmp_path)
    assert config.mlp == "gelu"


def test_torchs_tanh_gelu_converts_to_gelu_tanh(tmp_path):
    tiny_gpt2(activation_function="gelu_pytorch_tanh").save_pretrained(tmp_path)
    config, _ = convert_gpt2(tmp_path)
    assert config.mlp == "gelu_tanh"


def test_a_relu_squared_gpt2_converts_to_relu2_and_computes_its_logits(tmp_path):
    reference = tiny_gpt2(activation_function="relu2")
    reference.save_pretrained(tmp_path)
    config, state = convert_gpt2(tmp_path)
    assert config.mlp == "relu2"
    model = build_model(config)
    model.load_state_dict(state)
    with torch.no_grad():
        ours, _ = model.eval()(torch.tensor(PROMPT))
        theirs = reference(torch.tensor(PROMPT)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def copy_checkpoint(source: Path, folder: Path, config: dict[str, Any] | None = None,
                    weights: Any = None) -> Path:
    """A copy of a checkpoint folder with config.json's keys changed and its tensors passed
    through `weights` (a function of the tensor dict)."""
    folder.mkdir(exist_ok=True)
    hf = json.loads((source / HF_CONFIG).read_text()) | (config or {})
    (folder / HF_CONFIG).write_text(json.dumps(hf))
    tensors = load_file(source / HF_WEIGHTS)
    save_file(weights(tensors) if weights else tensors, folder / HF_WEIGHTS)
    return folder


@pytest.mark.parametrize(("change", "words"), [
    ({"model_type": "llama"}, "model_type is 'llama', but only GPT-2"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon is 1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx is True"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn is True"),
    ({"scale_attn_weights": False}, "scale_attn_weights is False"),
    ({"add_cross_attention": True}, "add_cross_attention is True"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is False"),
    ({"n_inner": 64}, "n_inner is 64, but gptlab's MLP is 4 * n_embd = 128 wide"),
    ({"n_head": 3}, "n_embd: 32 is not divisible by model.n_head=3"),
    ({"n_layer": 3}, "missing ['h.2.attn.c_attn.bias'"),
    ({"n_embd": 64, "n_head": 2}, "has shape (100, 32), but config.json describes (100, 64)"),
    ({"vocab_size": 90}, "tok_emb.weight has shape (100, 32)"),
])
def test_what_is_not_gpt2_is_refused_in_one_line(checkpoint, tmp_path, change, words):
    folder = copy_checkpoint(checkpoint, tmp_path / "changed", config=change)
    with pytest.raises(GptlabError, match=re.escape(words)) as error:
        convert_gpt2(folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def drop_one(tensors: dict) -> dict:
    return {name: t for name, t in tensors.items() if not name.endswith("h.1.mlp.c_fc.bias")}


def add_one(tensors: dict) -> dict:
    return tensors | {"transformer.h.0.attn.rotary.weight": torch.zeros(2)}


def untie(tensors: dict) -> dict:
    return tensors | {"lm_head.weight": torch.zeros(100, 32)}


@pytest.mark.parametrize(("weights", "words"), [
    (drop_one, "not a GPT-2 checkpoint (missing ['h.1.mlp.c_fc.bias'], unexpected []"),
    (add_one, "unexpected ['h.0.attn.rotary.weight']"),
    (untie, "lm_head.weight differs from wte.weight"),
])
def test_weights_that_are_not_gpt2s_are_refused(reference, tmp_path, weights, words):
    reference.save_pretrained(tmp_path / "saved")
    folder = copy_checkpoint(tmp_path / "saved", tmp_path / "changed", weights=weights)
    with pytest.raises(GptlabError, match=re.escape(words)):
        convert_gpt2(folder)


def test_a_saved_tied_head_and_the_mask_buffers_are_accepted(reference, tmp_path):
    """Older transformers versions saved the head (tied) and the causal-mask buffers."""
    reference.save_pretrained(tmp_path / "saved")

    def as_older_versions_saved(tensors: dict) -> dict:
        wte = tensors["transformer.wte.weight"]
        return tensors | {"lm_head.weight": wte.clone(),
                          "transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32),
                          "transformer.h.1.attn.masked_bias": torch.tensor(-1e4)}

    folder = copy_checkpoint(tmp_path / "saved", tmp_path / "older",
                             weights=as_older_versions_saved)
    config, state = convert_gpt2(folder)
    assert set(state) == set(build_model(config).state_dict())


@pytest.mark.parametrize(("missing", "words"), [(HF_CONFIG, "config.json: not found"),
                                                (HF_WEIGHTS, "model.safetensors: not found")])
def test_a_missing_file_is_named(reference, tmp_path, missing, words):
    reference.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(GptlabError, match=re.escape(words)):
        convert_gpt2(tmp_path)


def test_a_damaged_weights_file_is_named(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    (tmp_path / HF_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(GptlabError, match=r"model\.safetensors: not a safetensors weights file"):
        convert_gpt2(tmp_path)


# --- the Hub ----------------------------------------------------------------------------------


def test_every_hub_gpt2_is_openai_communitys_at_a_pinned_commit():
    assert set(HUB_GPT2) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    for name, (repo, commit) in HUB_GPT2.items():
        assert repo == f"openai-community/{name}"
        assert re.fullmatch(r"[0-9a-f]{40}", commit)


def test_an_unknown_gpt2_is_refused_with_the_known_ones():
    with pytest.raises(GptlabError, match=r"unknown GPT-2 'gpt3'.*'gpt2-medium'"):
        fetch_gpt2("gpt3")


def test_a_file_with_the_listed_sha256_passes_and_another_is_refused(tmp_path):
    path = tmp_path / HF_WEIGHTS
    path.write_bytes(b"weights")
    check_sha256(path, sha256_file(path))
    with pytest.raises(GptlabError, match=r"model.safetensors: sha256 is [0-9a-f]{64}, but the "
                                          r"Hub lists 0{64}"):
        check_sha256(path, "0" * 64)


def lfs_file(name: str, sha256: str) -> RepoSibling:
    return RepoSibling(rfilename=name, size=7, blob_id="b" * 40,
                       lfs=BlobLfsInfo(size=7, sha256=sha256, pointer_size=134))


def test_the_listed_sha256_is_the_weights_lfs_one():
    siblings = [RepoSibling(rfilename=HF_CONFIG, size=665), lfs_file(HF_WEIGHTS, "a" * 64)]
    assert listed_sha256(siblings, HF_WEIGHTS, "openai-community/gpt2") == "a" * 64
    with pytest.raises(GptlabError, match=re.escape(
            "openai-community/gpt2: the Hub lists no sha256 for config.json")):
        listed_sha256(siblings, HF_CONFIG, "openai-community/gpt2")


class StandInHub:
    """The Hub's two calls fetch_gpt2 makes, answered from a local checkpoint folder."""

    def __init__(self, folder: Path, listed_sha256: str) -> None:
        self.folder, self.listed_sha256, self.calls = folder, listed_sha256, []

    def model_info(self, repo: str, *, revision: str, files_metadata: bool) -> SimpleNamespace:
        self.calls.append(("model_info", repo, revision, files_metadata))
        return SimpleNamespace(siblings=[lfs_file(HF_WEIGHTS, self.listed_sha256)])

    def snapshot_download(self, repo: str, *, revision: str, allow_patterns: list[str]) -> str:
        self.calls.append(("snapshot_download", repo, revision, sorted(allow_patterns)))
        return str(self.folder)


@pytest.fixture
def hub(monkeypatch, reference, tmp_path) -> StandInHub:
    folder = save_as_hub(reference, tmp_path / "snapshot")
    stand_in = StandInHub(folder, sha256_file(folder / HF_WEIGHTS))
    monkeypatch.setattr(pretrained, "HfApi", lambda: stand_in)
    monkeypatch.setattr(pretrained, "snapshot_download", stand_in.snapshot_download)
    return stand_in


def test_fetch_downloads_the_pinned_commit_of_two_files_and_returns_them(hub):
    folder, commit = fetch_gpt2("gpt2-medium")
    repo, pinned = HUB_GPT2["gpt2-medium"]
    assert (folder, commit) == (hub.folder, pinned)
    assert hub.calls == [("model_info", repo, pinned, True),
                         ("snapshot_download", repo, pinned, [HF_CONFIG, HF_WEIGHTS])]
    config, _ = convert_gpt2(folder)
    assert config.n_layer == 2


def test_fetch_refuses_weights_whose_sha256_the_hub_does_not_list(hub):
    hub.listed_sha256 = "0" * 64
    with pytest.raises(GptlabError, match=r"sha256 is [0-9a-f]{64}, but the Hub lists 0{64}"):
        fetch_gpt2("gpt2")


def test_a_failed_download_is_one_line(monkeypatch, hub):
    def offline(*args: Any, **kwargs: Any) -> str:
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(pretrained, "snapshot_download", offline)
    with pytest.raises(GptlabError) as error:
        fetch_gpt2("gpt2")
    assert str(error.value) == (f"openai-community/gpt2@{HUB_GPT2['gpt2'][1]}: cannot download "
                                f"gpt2 (We couldn't connect to 'https://huggingface.co'.)")


# --- model.init: the weights training starts from ----------------------------------------------


def gpt2_tokens(folder: Path, kind: str = "tiktoken", encoding: str = "gpt2") -> Path:
    """A data/tokens folder's tokenizer.json as the tokenize stage writes it (the only file
    the GPT-2 check reads: no token files, and no download of the gpt2 encoding)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"kind": kind, "encoding": encoding}))
    return folder


def test_a_hub_gpt2_starts_a_run_whose_model_section_says_what_it_is(checkpoint, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(pretrained, "fetch_gpt2", lambda name: (checkpoint, "0" * 40))
    config, _ = convert_gpt2(checkpoint)
    state = initial_weights("gpt2", config, gpt2_tokens(tmp_path / "tokens"))
    model = build_model(config)
    model.load_state_dict(state)
    assert init_source("gpt2") == {"init": "gpt2", "repo": "openai-community/gpt2",
                                   "commit": HUB_GPT2["gpt2"][1]}
    # A model section that contradicts the checkpoint is named by its key.
    with pytest.raises(GptlabError, match=r"model\.n_layer: 3, but model\.init gpt2 has 2"):
        initial_weights("gpt2", config.model_copy(update={"n_layer": 3}),
                        gpt2_tokens(tmp_path / "tokens"))
    with pytest.raises(GptlabError, match=r"model\.mlp: 'gelu', but model\.init gpt2 has "
                                          r"'gelu_tanh'"):
        initial_weights("gpt2", config.model_copy(update={"mlp": "gelu"}),
                        gpt2_tokens(tmp_path / "tokens"))


@pytest.mark.parametrize(("kind", "encoding"), [("char", ""), ("tiktoken", "cl100k_base")])
def test_gpt2_weights_need_the_tokens_of_tiktoken_gpt2(checkpoint, tmp_path, monkeypatch, kind,
                                                      encoding):
    monkeypatch.setattr(pretrained, "fetch_gpt2", lambda name: pytest.fail("fetched"))
    config, _ = convert_gpt2(checkpoint)
    with pytest.raises(GptlabError, match=r"tokenizer\.kind: model\.init gpt2 needs the tokens "
                                          r"of tiktoken gpt2"):
        initial_weights("gpt2", config, gpt2_tokens(tmp_path / "tokens", kind, encoding))
