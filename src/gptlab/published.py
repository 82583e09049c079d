"""The published model, `models/`: everything evaluation, sampling and export need, and nothing
of how training got there.

    model.safetensors     the weights
    config.json           `PublishedConfig`: the model's config, its tokenizer, a training summary
    tokenizer.json        the tokenizer the model was trained with
    adapters.safetensors  after LoRA training, the adapters alone (already merged in the weights)

The folder is written whole or not at all, and loading it runs no code from its files (no
pickle). config.json records the sha256 of the weights and the tokenizer, and loading checks
them: a file damaged in a cache or a remote is named, not served, and a reader that meets a new
folder swapped in mid-read reads again rather than mixing the config of one model with the
weights of another. Resume state lives elsewhere (gptlab.checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from gptlab.errors import GptlabError
from gptlab.io import atomic_dir, read_text, sha256_file, write_json
from gptlab.model import build_model
from gptlab.params import ModelConfig, describe
from gptlab.tokenizers import Tokenizer, load_tokenizer

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
ADAPTERS = "adapters.safetensors"
HASHED = (WEIGHTS, TOKENIZER)
# Model keys added after models were published, each with the value that builds the model an
# older config.json describes.
KEYS_ADDED_LATER = {"pad_vocab": True, "qk_norm": False, "logit_softcap": None,
                    "proj_init": "scaled"}
# How often a reader starts over when the folder is replaced while it reads.
READ_TRIES = 5


class TokenizerReference(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str
    vocab_size: int = Field(ge=1)
    file: str
    # The chat template's tokens when the model was trained on conversations (see gptlab.chat).
    chat_tokens: list[str] | None = None


class PublishedConfig(BaseModel):
    """models/config.json."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal[1]
    model: ModelConfig
    tokenizer: TokenizerReference
    # What produced the weights (steps, seed, train params, versions): for people and reports.
    training: dict[str, Any]
    # The sha256 of each file of HASHED; folders written before it was recorded have none.
    sha256: dict[str, str] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def written_before_the_keys_existed(cls, model: Any) -> Any:
        # A config.json written before a model key existed holds a model built as that key's
        # value here builds it (padded tables, before model.pad_vocab).
        if isinstance(model, dict):
            return {**KEYS_ADDED_LATER, **model}
        return model


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
                                     file=TOKENIZER, chat_tokens=tokenizer.get("chat_tokens")),
        training=training)
    with atomic_dir(models_dir, "the trained model") as staging:
        save_model(model, str(staging / WEIGHTS))
        shutil.copyfile(tokenizer_path, staging / TOKENIZER)
        if adapters:
            save_file(adapters, str(staging / ADAPTERS))
        hashes = {name: sha256_file(staging / name) for name in HASHED}
        write_json(staging / CONFIG, published.model_copy(update={"sha256": hashes}).model_dump())


def load_published(models_dir: Path, device: torch.device | str = "cpu") -> Published:
    """The model saved by `save_published` on `device`, with its tokenizer and config.

    A folder swapped in while it is read (the train stage publishing) is read again, whole: the
    files read must be those its config.json recorded, all from the same folder.
    """
    device = torch.device(device)
    for _ in range(READ_TRIES):
        before = folder_identity(models_dir)
        try:
            published = read_files(models_dir, read_config(models_dir), device)
        except GptlabError:
            if folder_identity(models_dir) == before:
                raise
            continue
        if folder_identity(models_dir) == before:
            return published
    raise GptlabError(f"{models_dir}: replaced {READ_TRIES} times while being read; run again "
                      f"once training has published")


def folder_identity(models_dir: Path) -> tuple[int, int] | None:
    """What tells one published folder from the next: a swap (a rename) gives the folder at
    `models_dir` another inode, or at least another change time."""
    try:
        status = os.stat(models_dir)
    except OSError:
        return None
    return status.st_ino, status.st_ctime_ns


def read_files(models_dir: Path, config: PublishedConfig, device: torch.device) -> Published:
    """The weights and tokenizer of `models_dir`, checked against `config`."""
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
    check_sha256(models_dir, config)
    return Published(model.to(device), tokenizer, config, device)


def check_sha256(models_dir: Path, config: PublishedConfig) -> None:
    """Refuse a file whose bytes are not those config.json recorded (a damaged copy)."""
    for name, expected in (config.sha256 or {}).items():
        path = models_dir / name
        try:
            actual = sha256_file(path)
        except OSError as error:
            raise GptlabError(f"{path}: cannot be read: {error}") from None
        if actual != expected:
            raise GptlabError(f"{path}: damaged: its sha256 is not the one {models_dir / CONFIG} "
                              f"records (pull it again with `dvc pull`, or train again)")


def read_config(models_dir: Path) -> PublishedConfig:
    """models/config.json, validated."""
    path = models_dir / CONFIG
    return parse_config(read_text(path, missing="run the train stage first"), path)


def parse_config(text: str, path: Path) -> PublishedConfig:
    """The text of config.json at `path`, validated."""
    try:
        return PublishedConfig.model_validate_json(text)
    except ValidationError as error:
        problems = describe(error, PublishedConfig)
        raise GptlabError(f"{path}: not a gptlab model config ({problems})") from None
