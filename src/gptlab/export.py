"""The published model in Hugging Face's format: a folder that transformers loads with
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`.

    config.json             the model, as GPT2LMHeadModel or LlamaForCausalLM describe it
    model.safetensors       the weights under that architecture's names
    tokenizer.json          the tokenizer as a Hugging Face `tokenizers` tokenizer
    tokenizer_config.json   what AutoTokenizer needs besides: its class, the end-of-text token

Two layouts compute what gptlab's GPT computes: GPT-2's (learned positions, LayerNorm, a GELU
MLP) and Llama's (rotary positions, RMSNorm, SwiGLU). Other mixes, and the bigram, have none.
Writing the folder needs no transformers; loading it does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import tiktoken
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor, nn

from gptlab.chat import HF_CHAT_TEMPLATE
from gptlab.errors import GptlabError
from gptlab.io import atomic_dir, write_json, write_text
from gptlab.model import ROPE_BASE, swiglu_hidden_size
from gptlab.params import ModelConfig
from gptlab.pretrained import (
    HF_CONFIG,
    HF_WEIGHTS,
    LAYER_NORM_EPSILON,
    PREFIX,
    gpt2_tensor_names,
)
from gptlab.published import CONFIG, load_published
from gptlab.tokenizers import (
    EOT_TOKEN,
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    chat_tokens_of,
)

HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_FILES = (HF_CONFIG, HF_WEIGHTS, HF_TOKENIZER, HF_TOKENIZER_CONFIG)
# (pos, norm, mlp) of each model a layout expresses exactly.
LAYOUTS = {
    ("learned", "layernorm", "gelu"): "gpt2",
    ("learned", "layernorm", "gelu_tanh"): "gpt2",
    ("learned", "layernorm", "relu2"): "gpt2",
    ("rope", "rmsnorm", "swiglu"): "llama",
}
# transformers' names of gptlab's 4x MLPs' activations; `gelu_new` is GPT-2's own tanh
# approximation.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
# A bounded count made possessive, such as {1,3}+ (see oniguruma_pattern).
POSSESSIVE_COUNT = re.compile(r"(\{\d+(?:,\d*)?\})\+")
# torch.nn.RMSNorm(eps=None) adds the machine epsilon of its input's dtype; the weights are
# float32.
RMS_NORM_EPS = torch.finfo(torch.float32).eps
INITIALIZER_RANGE = 0.02  # gptlab's init, for whoever fine-tunes the export


def export_hf(models_dir: Path, out_dir: Path) -> str:
    """Write the model of `models_dir` and its tokenizer to `out_dir` in Hugging Face's format,
    the folder swapped in whole; the name of the layout written (gpt2 or llama)."""
    refuse_unsafe_out_dir(out_dir, models_dir)
    # The config loaded with the weights, not read on its own: a new model may be swapped in.
    published = load_published(models_dir)
    layout = hf_layout(published.config.model, models_dir / CONFIG)
    config, tokenizer = published.config.model, published.tokenizer
    to_layout = gpt2_weights if layout == "gpt2" else llama_weights
    weights = to_layout(published.model, config)
    with atomic_dir(out_dir, "the Hugging Face export") as staging:
        save_file(weights, staging / HF_WEIGHTS, metadata={"format": "pt"})
        write_json(staging / HF_CONFIG, hf_config(config, layout, tokenizer.eot_id))
        write_text(staging / HF_TOKENIZER, hf_tokenizer(tokenizer).to_str(pretty=True))
        write_json(staging / HF_TOKENIZER_CONFIG, tokenizer_config(config, tokenizer))
    return layout


def hf_layout(config: ModelConfig, where: Path) -> str:
    """The Hugging Face layout that computes what `config`'s model computes."""
    if config.arch != "gpt":
        raise GptlabError(f"{where}: a {config.arch} model has no Hugging Face layout; only "
                          f"arch gpt can be exported")
    if config.qk_norm or config.logit_softcap is not None:
        what = "query/key norm" if config.qk_norm else "soft-capped logits"
        raise GptlabError(f"{where}: a model with {what} fits no Hugging Face layout gptlab "
                          f"writes (GPT-2's and Llama's have neither)")
    layout = LAYOUTS.get((config.pos, config.norm, config.mlp))
    if layout is None:
        raise GptlabError(f"{where}: {config.pos} positions with {config.norm} and a "
                          f"{config.mlp} MLP fit no Hugging Face layout (GPT-2: learned, "
                          f"layernorm, gelu, gelu_tanh or relu2; Llama: rope, rmsnorm, swiglu)")
    return layout


def refuse_unsafe_out_dir(out_dir: Path, models_dir: Path) -> None:
    """Refuse an output folder whose swap would delete more than an earlier export."""
    if out_dir.resolve() == models_dir.resolve():
        raise GptlabError(f"{out_dir}: is the models folder itself; give another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(path.name not in HF_FILES for path in out_dir.iterdir()):
        raise GptlabError(f"{out_dir}: holds files an export does not write, which exporting "
                          f"would delete; give a new or empty folder")


def gpt2_weights(model: nn.Module, config: ModelConfig) -> dict[str, Tensor]:
    """The model's tensors under GPT2LMHeadModel's names, projections as Conv1D weights."""
    state = model.state_dict()
    weights = {}
    for theirs, ours, transposed in gpt2_tensor_names(config.n_layer):
        # GPT-2 has biases everywhere: zeros compute what a model without them computes.
        tensor = state.get(ours)
        if tensor is None:
            tensor = torch.zeros(state[ours.removesuffix("bias") + "weight"].size(0))
        weights[PREFIX + theirs] = tensor.t() if transposed else tensor
    weights[PREFIX + "wte.weight"] = state["tok_emb.weight"][: config.vocab_size]
    if not config.tie_weights:
        weights["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
    return standalone(weights)


def llama_weights(model: nn.Module, config: ModelConfig) -> dict[str, Tensor]:
    """The model's tensors under LlamaForCausalLM's names, the fused qkv projection split."""
    state = model.state_dict()
    weights = {"model.embed_tokens.weight": state["tok_emb.weight"][: config.vocab_size],
               "model.norm.weight": state["final_norm.weight"]}
    for layer in range(config.n_layer):
        ours, theirs = f"blocks.{layer}.", f"model.layers.{layer}."
        weights[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        weights[theirs + "post_attention_layernorm.weight"] = state[ours + "mlp_norm.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = state[f"{ours}attn.qkv_proj.{kind}"].split(config.n_embd)
            weights[f"{theirs}self_attn.q_proj.{kind}"] = q
            weights[f"{theirs}self_attn.k_proj.{kind}"] = k
            weights[f"{theirs}self_attn.v_proj.{kind}"] = v
            weights[f"{theirs}self_attn.o_proj.{kind}"] = state[f"{ours}attn.out_proj.{kind}"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                weights[f"{theirs}mlp.{proj}.{kind}"] = state[f"{ours}mlp.{proj}.{kind}"]
    if not config.tie_weights:
        weights["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
    return standalone(weights)


def standalone(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor in memory of its own: safetensors refuses views of one another's storage,
    as the split projections and the cut embedding are."""
    return {name: tensor.detach().clone(memory_format=torch.contiguous_format)
            for name, tensor in weights.items()}


def hf_config(config: ModelConfig, layout: str, eot_id: int | None) -> dict[str, Any]:
    """config.json for transformers: the architecture, its shape and the special tokens."""
    shared = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_weights,
              "bos_token_id": eot_id, "eos_token_id": eot_id,
              "initializer_range": INITIALIZER_RANGE, "torch_dtype": "float32"}
    if layout == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                "n_positions": config.block_size, "n_inner": None,
                "activation_function": HF_ACTIVATIONS[config.mlp],
                "layer_norm_epsilon": LAYER_NORM_EPSILON,
                "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "resid_pdrop": config.dropout, **shared}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_head, "hidden_size": config.n_embd,
            "head_dim": config.head_dim, "intermediate_size": swiglu_hidden_size(config.n_embd),
            "hidden_act": "silu", "max_position_embeddings": config.block_size,
            "rope_theta": ROPE_BASE, "rms_norm_eps": RMS_NORM_EPS,
            "attention_bias": config.bias, "mlp_bias": config.bias,
            "attention_dropout": config.dropout, **shared}


def tokenizer_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json: the tokenizer as tokenizer.json alone, its text decoded as is,
    and for a model with the chat tokens, gptlab's chat template for apply_chat_template."""
    special = {"eos_token": EOT_TOKEN} if tokenizer.eot_id is not None else {}
    if chat_tokens_of(tokenizer):
        special["chat_template"] = HF_CHAT_TEMPLATE
    # transformers' clean-up would delete spaces before punctuation: decode text as it was.
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": config.block_size, **special}


def hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """The Hugging Face `tokenizers` tokenizer that gives the same ids for the same text."""
    if isinstance(tokenizer, ChatTokenizer):
        return with_chat_tokens(hf_tokenizer(tokenizer.base), tokenizer)
    if isinstance(tokenizer, CharTokenizer):
        return char_hf_tokenizer(tokenizer.chars)
    if isinstance(tokenizer, BPETokenizer):  # already a `tokenizers` tokenizer
        return HFTokenizer.from_str(json.dumps(tokenizer.to_json()["tokenizer"]))
    if isinstance(tokenizer, TiktokenTokenizer):
        return tiktoken_hf_tokenizer(tiktoken.get_encoding(tokenizer.encoding))
    raise GptlabError(f"a {tokenizer.kind} tokenizer has no Hugging Face export")


def with_chat_tokens(hf: HFTokenizer, tokenizer: ChatTokenizer) -> HFTokenizer:
    """`hf` with the chat tokens as special tokens of gptlab's ids: put in the model's
    vocabulary first, since `add_special_tokens` would number new tokens itself (after the
    largest id, which for tiktoken's cl100k_base is not the vocabulary's size)."""
    definition = json.loads(hf.to_str())
    definition["model"]["vocab"].update(tokenizer.special_ids)
    hf = HFTokenizer.from_str(json.dumps(definition))
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False)
                           for token in tokenizer.special_ids])
    return hf


def char_hf_tokenizer(chars: str) -> HFTokenizer:
    """One token per character, numbered as gptlab's char tokenizer numbers them; a
    character outside the vocabulary is an error, as it is in gptlab."""
    # An unknown token not in the vocabulary: WordLevel then refuses an unknown character.
    hf = HFTokenizer(models.WordLevel({char: i for i, char in enumerate(chars)},
                                      unk_token="[UNK]"))
    # [\s\S]: any one character, line breaks included.
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()  # the characters joined back, without spaces between
    return hf


def tiktoken_hf_tokenizer(encoding: tiktoken.Encoding) -> HFTokenizer:
    """The byte-level BPE tokenizer that encodes as `encoding` does (for tiktoken's gpt2:
    GPT-2's own): tokens spelt in GPT-2's alphabet of byte characters, merges recovered from
    the ranks, the same split pattern and special tokens."""
    # tiktoken has no public accessors for the ranks, the pattern or the special tokens.
    ranks, specials = encoding._mergeable_ranks, encoding._special_tokens
    vocab = {byte_level_spelling(token): rank for token, rank in ranks.items()} | specials
    merges = [(byte_level_spelling(left), byte_level_spelling(right))
              for left, right in recovered_merges(ranks)]
    # ignore_merges: a piece that is a token is that token, as tiktoken encodes it.
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_pattern(encoding._pat_str)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False)
                           for token in sorted(specials, key=specials.get)])
    return hf


def oniguruma_pattern(pattern: str) -> str:
    """A tiktoken split pattern as `tokenizers`' regex engine, Oniguruma, reads it the same.

    Oniguruma reads `X{1,3}+` as a repetition of `X{1,3}`, not as tiktoken's possessive count,
    and would take "12345" as one piece instead of "123" and "45". In tiktoken's patterns such a
    count ends its alternative, where the greedy count matches what the possessive one does.
    """
    return POSSESSIVE_COUNT.sub(r"\1", pattern)


def recovered_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges that encode as tiktoken's ranks do: every pair of tokens that joins into a
    token, ordered by the rank of the token they make.

    tiktoken merges, at each step, the adjacent pair whose join has the lowest rank, whatever
    the pair; a merge list ordered by that rank lets `tokenizers` choose the same.
    """
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in ranks and token[cut:] in ranks]
        merges += sorted(pairs, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def byte_level_spelling(token: bytes) -> str:
    """A token's bytes as byte-level BPE vocabularies spell them, one printable character
    per byte (GPT-2's bytes_to_unicode)."""
    return "".join(BYTE_CHARACTERS[byte] for byte in token)


def byte_characters() -> list[str]:
    """GPT-2's character for each byte: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


BYTE_CHARACTERS = byte_characters()
