"""The one loader of params.yaml: every section validated before any stage does work.

params.yaml is the single source of truth for values: there are no defaults here, so a missing
key is an error rather than a silent fallback that `dvc exp show` would never display.
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

from gptlab.errors import GptlabError
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


class HfParams(Section):
    revision: str = Field(min_length=1)
    text_column: str = Field(min_length=1)
    max_documents: int | None = Field(ge=1)
    max_bytes: int | None = Field(ge=1)


class DataParams(Section):
    source: Literal["pip", "url", "local", "hf"]
    spec: str = Field(min_length=1)
    sha256: str | None
    include: list[str]
    hf: HfParams

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
    strip_boilerplate: bool
    unicode: Literal["NFC", "NFKC", "none"]
    lowercase: bool
    collapse_whitespace: bool
    dedupe: Literal["none", "exact", "near"]
    near_threshold: float = Field(gt=0, le=1)
    min_chars: int = Field(ge=0)
    split: Literal["documents", "tail"]
    val_fraction: float = Field(gt=0, lt=1)
    split_seed: int


class TokenizerParams(Section):
    kind: Literal["char", "bpe", "tiktoken"]
    vocab_size: int = Field(ge=260, le=1 << 31)
    encoding: str = Field(min_length=1)
    shard_tokens: int = Field(ge=1)
    # A gptlab models/ folder whose tokenizer is used instead (kind and the rest ignored), so
    # that model.init can start from that model.
    from_model: str | None = Field(min_length=1)
    # Conversations: the targets the loss counts, answers (the assistant's tokens) | all.
    chat_loss: Literal["answers", "all"]


class ModelShape(Section):
    """What a model is: its shape and architectural choices."""

    arch: Literal["gpt", "bigram"]
    n_layer: int = Field(ge=1)
    n_head: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    block_size: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    bias: bool
    tie_weights: bool
    pos: Literal["learned", "rope"]
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu", "gelu_tanh", "swiglu"]

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
    init: str = Field(min_length=1)

    @property
    def pretrained(self) -> bool:
        return self.init != "scratch"


class ModelConfig(ModelShape):
    """A model's whole description: its shape plus what the token files decide.

    The one schema of a model: the model is built from it and models/config.json stores it.
    """

    vocab_size: int = Field(ge=1)  # the tokenizer's true vocabulary; tables are padded beyond it
    # Off only to measure what the padding buys (`make bench`); a config saved before the key
    # existed was trained with padding.
    pad_vocab: bool = True

    @classmethod
    def of(cls, model: ModelParams, vocab_size: int) -> ModelConfig:
        return cls(**model.model_dump(exclude={"init"}), vocab_size=vocab_size)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the embedding and lm-head matmuls on fast kernel tile sizes.
        if not self.pad_vocab:
            return self.vocab_size
        return math.ceil(self.vocab_size / 64) * 64


class LoraParams(Section):
    """Low-rank adapters (Hu et al., 2021): only they train, the model's weights stay frozen."""

    rank: int = Field(ge=0)  # 0: no adapters, every weight trains
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    targets: list[Literal["qkv_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]]

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.rank and not self.targets:
            return [("targets", "adapters need at least one projection to adapt")]
        return []


class TrainParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    compile: bool
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"]
    nproc: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    max_iters: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_iters: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    grad_clip: float = Field(ge=0)
    optimizer: Literal["adamw"]
    eval_interval: int = Field(ge=1)
    eval_iters: int = Field(ge=1)
    log_interval: int = Field(ge=1)
    checkpoint_interval: int = Field(ge=1)
    lora: LoraParams

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
    device: Literal["auto", "cpu", "cuda", "mps"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    batch_size: int = Field(ge=1)
    train_split: bool
    train_tokens: int = Field(ge=1)
    tasks: list[str]
    task_limit: int | None = Field(ge=1)
    task_seed: int
    num_fewshot: int = Field(ge=0)

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
    device: Literal["auto", "cpu", "cuda", "mps"]
    prompts: list[str]
    num_samples: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float
    top_k: int | None
    top_p: float
    greedy: bool
    seed: int

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
    dpi: int = Field(ge=50, le=600)
    smooth: int = Field(ge=1)


class Params(Section):
    seed: int
    data: DataParams
    clean: CleanParams
    tokenizer: TokenizerParams
    model: ModelParams
    train: TrainParams
    eval: EvalParams
    sample: SampleParams
    plot: PlotParams


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
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {key_name('.'.join([*map(str, loc[:-1]), close[0]]))!r}?)"
