"""The published model, `models/`: everything evaluation, sampling and export need, and nothing
of how training got there.

    model.safetensors     the weights
    config.json           `PublishedConfig`: the model's config, its tokenizer, a training summary
    tokenizer.json        the tokenizer the model was trained with
    adapters.safetensors  after LoRA training, the adapters alone (already merged in the weights)

The folder is written whole or not at all, and loading it runs no code from its files (no
pickle). Resume state lives elsewhere (gptlab.checkpoint).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from gptlab.errors import GptlabError
from gptlab.io import atomic_dir, read_text, write_json
from gptlab.model import build_model
from gptlab.params import ModelConfig, describe
from gptlab.tokenizers import Tokenizer, load_tokenizer

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
ADAPTERS = "adapters.safetensors"


class TokenizerReference(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str
    vocab_size: int = Field(ge=1)
    file: str


class PublishedConfig(BaseModel):
    """models/config.json."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal[1]
    model: ModelConfig
    tokenizer: TokenizerReference
    # What produced the weights (steps, seed, train params, versions): for people and reports.
    training: dict[str, Any]


@dataclass(frozen=True)
class Published:
    """A loaded models/ folder: the model on its device, its tokenizer and its config."""

    model: nn.Module
    tokenizer: Tokenizer
    config: PublishedConfig
    device: torch.device


def save_published(model: nn.Module, config: ModelConfig, tokenizer_path: Path,
                   training: dict[str, Any], models_dir: Path,
                   adapters: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights, their config, a copy of the tokenizer file and any LoRA adapters to
    `models_dir`, swapped in whole."""
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    published = PublishedConfig(
        format=FORMAT, model=config,
        tokenizer=TokenizerReference(kind=tokenizer["kind"], vocab_size=tokenizer["vocab_size"],
                                     file=TOKENIZER),
        training=training)
    with atomic_dir(models_dir, "the trained model") as staging:
        save_model(model, str(staging / WEIGHTS))
        write_json(staging / CONFIG, published.model_dump())
        shutil.copyfile(tokenizer_path, staging / TOKENIZER)
        if adapters:
            save_file(adapters, str(staging / ADAPTERS))


def load_published(models_dir: Path, device: torch.device | str = "cpu") -> Published:
    """The model saved by `save_published` on `device`, with its tokenizer and config."""
    device = torch.device(device)
    config = read_config(models_dir)
    model = build_model(config.model)
    weights = models_dir / WEIGHTS
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except FileNotFoundError:
        raise GptlabError(f"{weights}: not found (run the train stage first)") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise GptlabError(f"{weights}: not a safetensors weights file ({error})") from None
    except RuntimeError as error:  # shapes that do not fit the config
        raise GptlabError(f"{weights}: does not match {models_dir / CONFIG} ({error})") from None
    if missing or unexpected:
        raise GptlabError(f"{weights}: does not match {models_dir / CONFIG} (missing {missing}, "
                          f"unexpected {unexpected})")
    tokenizer = load_tokenizer(models_dir / TOKENIZER)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise GptlabError(f"{models_dir / TOKENIZER}: {tokenizer.vocab_size} tokens, but the "
                          f"model was trained on {config.model.vocab_size}")
    return Published(model.to(device), tokenizer, config, device)


def read_config(models_dir: Path) -> PublishedConfig:
    """models/config.json, validated."""
    path = models_dir / CONFIG
    text = read_text(path, missing="run the train stage first")
    try:
        return PublishedConfig.model_validate_json(text)
    except ValidationError as error:
        problems = describe(error, PublishedConfig)
        raise GptlabError(f"{path}: not a gptlab model config ({problems})") from None
