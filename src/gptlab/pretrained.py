"""GPT-2's published weights in gptlab's layout.

A Hugging Face GPT-2 checkpoint folder (config.json + model.safetensors, as `save_pretrained`
writes it or as the Hub stores OpenAI's models) becomes a `ModelConfig` and a state dict that
`build_model(config)` loads:

    folder, commit = fetch_gpt2("gpt2")             # the Hub's openai-community/gpt2, pinned
    config, state = convert_gpt2(folder, dropout=0.0)
    model = build_model(config)
    model.load_state_dict(state)

gptlab's GPT with learned positions, LayerNorm, biases, tied embeddings and `gelu_tanh` is
GPT-2's architecture, so the conversion is a renaming: GPT-2 stores its projections as Conv1D
weights, (in, out), which gptlab's Linear layers hold transposed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from gptlab.errors import GptlabError
from gptlab.io import read_text, sha256_file
from gptlab.model import build_model
from gptlab.params import GPT2_ARCHITECTURE, ModelConfig, describe
from gptlab.published import Published, load_published
from gptlab.tokenizers import TiktokenTokenizer, load_tokenizer, without_chat_tokens
from gptlab.tokens import read_meta, tokenizer_path

# A Hugging Face checkpoint folder's files.
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# The Hub's GPT-2s, each pinned to the commit of its repository that was checked: a changed
# repository cannot change the weights under a name.
HUB_GPT2 = {
    "gpt2": ("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e"),
    "gpt2-medium": ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "gpt2-large": ("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519"),
    "gpt2-xl": ("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2"),
}
# Hugging Face's names of GPT-2's GELU: its tanh approximation (`gelu_new` computes it in
# Python, `gelu_pytorch_tanh` with torch's kernel), or the exact one; and ReLU squared, which
# gptlab's relu2 models export as.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu2": "relu2"}
LAYER_NORM_EPSILON = 1e-5  # torch's LayerNorm default, which gptlab's LayerNorm uses
# GPT2LMHeadModel prefixes its tensors; the Hub's OpenAI checkpoints were saved without it.
PREFIX = "transformer."
# Causal-mask buffers that older transformers versions saved with the weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# Each GPT-2 tensor of block i (`h.{i}.`) and its gptlab name (`blocks.{i}.`); True where GPT-2
# stores it as a Conv1D weight, the transpose of gptlab's Linear weight.
GPT2_BLOCK_TENSORS = (
    ("ln_1.weight", "attn_norm.weight", False),
    ("ln_1.bias", "attn_norm.bias", False),
    ("attn.c_attn.weight", "attn.qkv_proj.weight", True),
    ("attn.c_attn.bias", "attn.qkv_proj.bias", False),
    ("attn.c_proj.weight", "attn.out_proj.weight", True),
    ("attn.c_proj.bias", "attn.out_proj.bias", False),
    ("ln_2.weight", "mlp_norm.weight", False),
    ("ln_2.bias", "mlp_norm.bias", False),
    ("mlp.c_fc.weight", "mlp.up_proj.weight", True),
    ("mlp.c_fc.bias", "mlp.up_proj.bias", False),
    ("mlp.c_proj.weight", "mlp.down_proj.weight", True),
    ("mlp.c_proj.bias", "mlp.down_proj.bias", False),
)
GPT2_OUTER_TENSORS = (
    ("wte.weight", "tok_emb.weight", False),
    ("wpe.weight", "pos_emb.weight", False),
    ("ln_f.weight", "final_norm.weight", False),
    ("ln_f.bias", "final_norm.bias", False),
)


def gpt2_tensor_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(GPT-2 name, gptlab name, transposed) of every tensor of an n_layer GPT-2, GPT-2's names
    without the `transformer.` prefix."""
    names = list(GPT2_OUTER_TENSORS)
    for layer in range(n_layer):
        names += [(f"h.{layer}.{theirs}", f"blocks.{layer}.{ours}", transposed)
                  for theirs, ours, transposed in GPT2_BLOCK_TENSORS]
    return names


def convert_gpt2(folder: Path, dropout: float = 0.0) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and state dict of gptlab's model of the GPT-2 checkpoint in `folder`."""
    config = gpt2_config(folder, dropout)
    return config, gpt2_state_dict(folder, config)


def gpt2_config(folder: Path, dropout: float = 0.0) -> ModelConfig:
    """gptlab's config of the GPT-2 whose Hugging Face config.json is in `folder`; anything of
    it that gptlab's GPT does not compute the same way is refused."""
    path = folder / HF_CONFIG
    hf = read_hf_config(path)
    refuse_unlike_gpt2(hf, path)
    fields = {**GPT2_ARCHITECTURE, "n_layer": hf.get("n_layer"), "n_head": hf.get("n_head"),
              "n_embd": hf.get("n_embd"), "block_size": hf.get("n_positions"),
              "vocab_size": hf.get("vocab_size"), "dropout": dropout,
              "mlp": GPT2_ACTIVATIONS[hf.get("activation_function", "gelu_new")]}
    try:
        config = ModelConfig(**fields)
    except ValidationError as error:
        raise GptlabError(f"{path}: not a GPT-2 gptlab can build "
                          f"({describe(error, ModelConfig)})") from None
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * config.n_embd:
        raise GptlabError(f"{path}: n_inner is {n_inner}, but gptlab's MLP is 4 * n_embd = "
                          f"{4 * config.n_embd} wide")
    return config


def read_hf_config(path: Path) -> dict[str, Any]:
    """A Hugging Face config.json's keys and values."""
    text = read_text(path, missing="expected a Hugging Face GPT-2 checkpoint folder")
    try:
        hf = json.loads(text)
    except json.JSONDecodeError as error:
        raise GptlabError(f"{path}: not JSON ({error})") from None
    if not isinstance(hf, dict):
        raise GptlabError(f"{path}: expected a JSON object")
    return hf


def refuse_unlike_gpt2(hf: dict[str, Any], path: Path) -> None:
    """Raise on the first setting of a Hugging Face config that makes it other than GPT-2.

    Absent keys take GPT2Config's defaults, as transformers reads them: the Hub's own GPT-2
    configs leave most of them out.
    """
    if hf.get("model_type") != "gpt2":
        raise GptlabError(f"{path}: model_type is {hf.get('model_type')!r}, but only GPT-2 "
                          f"checkpoints (model_type 'gpt2') can be converted")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise GptlabError(f"{path}: activation_function {activation!r} is not supported "
                          f"(expected one of {sorted(GPT2_ACTIVATIONS)})")
    epsilon = hf.get("layer_norm_epsilon", LAYER_NORM_EPSILON)
    if epsilon != LAYER_NORM_EPSILON:
        raise GptlabError(f"{path}: layer_norm_epsilon is {epsilon}, but gptlab's LayerNorm "
                          f"uses {LAYER_NORM_EPSILON}")
    for key, gpt2_value in (("scale_attn_weights", True),
                            ("scale_attn_by_inverse_layer_idx", False),
                            ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                            ("tie_word_embeddings", True)):
        if hf.get(key, gpt2_value) != gpt2_value:
            raise GptlabError(f"{path}: {key} is {hf[key]!r}; gptlab converts only GPT-2 as "
                              f"published, with {key} {gpt2_value}")


def gpt2_state_dict(folder: Path, config: ModelConfig) -> dict[str, Tensor]:
    """The weights of `folder`'s model.safetensors, renamed, transposed and padded for
    `build_model(config)`."""
    path = folder / HF_WEIGHTS
    theirs = read_gpt2_tensors(path, config.n_layer)
    head = theirs.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, theirs["wte.weight"]):
        raise GptlabError(f"{path}: lm_head.weight differs from wte.weight, but GPT-2's output "
                          f"layer is its token embedding")
    ours = {our_name: theirs[their_name].t().contiguous() if transposed else theirs[their_name]
            for their_name, our_name, transposed in gpt2_tensor_names(config.n_layer)}
    check_shapes(ours, config, path)
    ours["tok_emb.weight"] = padded_rows(ours["tok_emb.weight"], config.padded_vocab_size)
    ours["lm_head.weight"] = ours["tok_emb.weight"]  # tied: state_dict() lists it under both
    return ours


def read_gpt2_tensors(path: Path, n_layer: int) -> dict[str, Tensor]:
    """The tensors of an n_layer GPT-2's safetensors file by their names without
    `transformer.`, the mask buffers left out; a tensor missing or one more is refused."""
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (expected a Hugging Face GPT-2 checkpoint "
                          f"folder)") from None
    except (SafetensorError, OSError) as error:
        raise GptlabError(f"{path}: not a safetensors weights file ({error})") from None
    tensors = {name.removeprefix(PREFIX): tensor for name, tensor in tensors.items()
               if not MASK_BUFFER.fullmatch(name.removeprefix(PREFIX))}
    expected = {name for name, _, _ in gpt2_tensor_names(n_layer)}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise GptlabError(f"{path}: not a GPT-2 checkpoint (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return tensors


def padded_rows(table: Tensor, rows: int) -> Tensor:
    """`table` with zero rows appended up to `rows`: the padded vocabulary is never scored."""
    return torch.cat([table, table.new_zeros(rows - table.size(0), table.size(1))])


def check_shapes(state: dict[str, Tensor], config: ModelConfig, path: Path) -> None:
    """Refuse tensors whose shapes differ from those of `build_model(config)`, before the
    vocabulary is padded."""
    unpadded = config.model_copy(update={"pad_vocab": False})
    with torch.device("meta"):  # shapes without allocating a model's worth of memory
        expected = build_model(unpadded).state_dict()
    del expected["lm_head.weight"]  # the token embedding, tied
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise GptlabError(f"{path}: {name} has shape {tuple(state[name].shape)}, but "
                              f"{HF_CONFIG} describes {tuple(tensor.shape)}")


def fetch_gpt2(name: str) -> tuple[Path, str]:
    """Download the Hub's GPT-2 `name` (gpt2, gpt2-medium, gpt2-large, gpt2-xl) at its pinned
    commit into huggingface_hub's shared cache, checked against the sha256 the Hub lists for
    its weights; the local folder and the commit.

    Only config.json and model.safetensors are fetched: the repositories also hold the same
    weights in several other formats.
    """
    if name not in HUB_GPT2:
        raise GptlabError(f"unknown GPT-2 {name!r}; expected one of {sorted(HUB_GPT2)}")
    repo, commit = HUB_GPT2[name]
    try:
        listed = HfApi().model_info(repo, revision=commit, files_metadata=True).siblings
        folder = Path(snapshot_download(repo, revision=commit,
                                        allow_patterns=[HF_CONFIG, HF_WEIGHTS]))
    except Exception as error:  # huggingface_hub's HTTP, cache and offline errors alike
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise GptlabError(f"{repo}@{commit}: cannot download {name} ({first_line})") from None
    check_sha256(folder / HF_WEIGHTS, listed_sha256(listed or [], HF_WEIGHTS, repo))
    return folder, commit


def listed_sha256(siblings: list[Any], filename: str, repo: str) -> str:
    """The sha256 the Hub lists for `filename` among a repository's files (its LFS metadata)."""
    for sibling in siblings:
        if sibling.rfilename == filename and sibling.lfs is not None:
            return sibling.lfs.sha256
    raise GptlabError(f"{repo}: the Hub lists no sha256 for {filename}")


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a downloaded file whose sha256 is not `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise GptlabError(f"{path}: sha256 is {actual}, but the Hub lists {expected}; delete "
                          f"the file and download it again")


# --- the weights training starts from (model.init) ---------------------------------------------


def initial_weights(init: str, config: ModelConfig, tokens_dir: Path) -> dict[str, Tensor]:
    """The weights `init` names (a Hub GPT-2, or a gptlab models/ folder) as a state dict for
    `build_model(config)`, refused unless their shape is `config`'s (params.yaml's model
    section must say what the checkpoint is) and the token files were made with their
    tokenizer."""
    if init in HUB_GPT2:
        refuse_tokens_not_of_gpt2(tokens_dir, init)
        folder, _ = fetch_gpt2(init)
        pretrained, state = convert_gpt2(folder, dropout=config.dropout)
    else:
        published = load_published(Path(init))
        refuse_tokens_of_another_tokenizer(tokens_dir, published, init)
        pretrained, state = published.config.model, published.model.state_dict()
        if config.vocab_size > pretrained.vocab_size:  # the chat tokens added to its vocabulary
            state = grown_vocabulary(state, pretrained, config)
            pretrained = pretrained.model_copy(update={"vocab_size": config.vocab_size})
    refuse_another_shape(config, pretrained, init)
    return state


def grown_vocabulary(state: dict[str, Tensor], pretrained: ModelConfig,
                     config: ModelConfig) -> dict[str, Tensor]:
    """`state` with its token tables grown from `pretrained`'s vocabulary to `config`'s: the
    old rows unchanged, each new one the mean of the old ones (an embedding like an average
    token's, and at first an average logit, rather than a random one), padding rows zero."""
    if pretrained.arch != "gpt":
        raise GptlabError(f"model.init: a {pretrained.arch} model's vocabulary cannot grow "
                          f"(to add the chat tokens); start from a gpt")
    old, new = pretrained.vocab_size, config.vocab_size
    grown = dict(state)
    for name in ("tok_emb.weight", "lm_head.weight"):
        table = state[name][:old]
        rows = padded_rows(table, config.padded_vocab_size)
        rows[old:new] = table.mean(dim=0)
        grown[name] = rows
    return grown


def init_source(init: str) -> dict[str, str]:
    """Where a run's first weights came from, for models/config.json: a Hub GPT-2 with the
    commit it is pinned to, a gptlab models/ folder, or scratch."""
    if init in HUB_GPT2:
        repo, commit = HUB_GPT2[init]
        return {"init": init, "repo": repo, "commit": commit}
    return {"init": init}


def refuse_another_shape(config: ModelConfig, pretrained: ModelConfig, init: str) -> None:
    """One line naming the first model key that contradicts the checkpoint's shape (dropout is
    a training choice, free to differ)."""
    ours, theirs = config.model_dump(), pretrained.model_dump()
    for key in ours:
        if key != "dropout" and ours[key] != theirs[key]:
            where = "tokenizer.vocab_size" if key == "vocab_size" else f"model.{key}"
            raise GptlabError(f"{where}: {ours[key]!r}, but model.init {init} has "
                              f"{theirs[key]!r}; the shape comes from the checkpoint")


def refuse_tokens_not_of_gpt2(tokens_dir: Path, init: str) -> None:
    path = tokenizer_path(tokens_dir)
    tokenizer = json.loads(read_text(path, missing="run the tokenize stage first"))
    if (tokenizer.get("kind"), tokenizer.get("encoding")) != (TiktokenTokenizer.kind, "gpt2"):
        raise GptlabError(f"tokenizer.kind: model.init {init} needs the tokens of tiktoken "
                          f"gpt2 (tokenizer.kind: tiktoken, tokenizer.encoding: gpt2), but "
                          f"{path} is {tokenizer.get('kind')} {tokenizer.get('encoding', '')}")


def refuse_tokens_of_another_tokenizer(tokens_dir: Path, published: Published,
                                       init: str) -> None:
    meta = read_meta(tokens_dir, [])
    if meta["tokenizer_fingerprint"] == published.tokenizer.fingerprint:
        return
    # Tokens of its tokenizer with the chat tokens appended are its tokens too.
    base = without_chat_tokens(load_tokenizer(tokenizer_path(tokens_dir)))
    if base.fingerprint != published.tokenizer.fingerprint:
        raise GptlabError(f"model.init: {init} was trained with another tokenizer than the one "
                          f"{tokens_dir} was made with; tokenize with its tokenizer")
