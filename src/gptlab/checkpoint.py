"""Weights and resume state on disk, saved and loaded without pickle.

Published weights (`models/`): `model.safetensors`, `config.json` (model config, tokenizer
reference, training summary) and a copy of `tokenizer.json`, so the folder alone is enough to
sample from. Resume state lives apart, in `.gptlab/runs/<key>/checkpoint/`: the model and
optimizer tensors as safetensors and everything else (step, RNG of the batch sampler, log so
far) as JSON. Loading runs no code from the files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from gptlab.errors import GptlabError
from gptlab.io import atomic_dir, write_json
from gptlab.model import GPTConfig, build_model

CHECKPOINT_FORMAT = 1
# Version of the resume state's layout; a run finding an older one starts afresh.
RESUME_FORMAT = 3
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def save_published(model: nn.Module, config: GPTConfig, tokenizer_path: Path, summary: dict,
                   models_dir: Path) -> None:
    """Write the weights, their config and the tokenizer to `models_dir`, swapped in whole."""
    with atomic_dir(models_dir) as staging:
        save_model(model, str(staging / WEIGHTS))
        tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        write_json(staging / CONFIG, {
            "format": CHECKPOINT_FORMAT,
            "model": asdict(config),
            "tokenizer": {"kind": tokenizer["kind"], "vocab_size": tokenizer["vocab_size"],
                          "file": TOKENIZER},
            "training": summary,
        })
        shutil.copyfile(tokenizer_path, staging / TOKENIZER)


def load_published(models_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model saved by `save_published`, and its config.json contents."""
    config_path = models_dir / CONFIG
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        config = GPTConfig(**saved["model"])
    except FileNotFoundError:
        raise GptlabError(f"{config_path}: not found (run the train stage first)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise GptlabError(f"{config_path}: not a gptlab model config ({error})") from None
    model = build_model(config)
    weights = models_dir / WEIGHTS
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except FileNotFoundError:
        raise GptlabError(f"{weights}: not found (run the train stage first)") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise GptlabError(f"{weights}: not a safetensors weights file ({error})") from None
    except RuntimeError as error:  # shapes that do not fit the config
        raise GptlabError(f"{weights}: does not match {config_path} ({error})") from None
    if missing or unexpected:
        raise GptlabError(f"{weights}: does not match {config_path} (missing {missing}, "
                          f"unexpected {unexpected})")
    return model.to(device), saved


class IncompatibleCheckpoint(GptlabError):
    """A resume checkpoint written by another version of gptlab."""


@dataclass
class ResumeState:
    """Everything besides the model and optimizer that a run needs to continue bit for bit."""

    step: int
    batch_rng: dict[str, Any]
    best_val_loss: float | None
    wall_seconds: float
    log: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)
    # The unfinished log interval: steps taken and their summed loss.
    interval_steps: int = 0
    interval_loss_sum: float = 0.0
    # Under DDP, the batch and dropout generators of ranks 1, 2, ... (rank 0's are above).
    other_ranks: list[dict[str, Any]] = field(default_factory=list)


def save_resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                state: ResumeState) -> None:
    """Write a resumable checkpoint to `folder`, replacing the previous one only when complete."""
    optimizer_state = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    with atomic_dir(folder) as staging:
        save_model(model, str(staging / WEIGHTS))
        save_file(tensors, str(staging / "state.safetensors"))
        write_json(staging / "state.json", {
            "format": RESUME_FORMAT,
            **asdict(state),
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
        })


def load_resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> ResumeState:
    """Restore model, optimizer and RNG from `folder`; return the rest of the run's state."""
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("state.json is not an object")
    except (OSError, ValueError) as error:
        raise GptlabError(f"{folder}: damaged resume checkpoint ({error}); delete the folder "
                          f"to start the run afresh") from None
    if meta.get("format") != RESUME_FORMAT:
        raise IncompatibleCheckpoint(f"{folder}: resume checkpoint format "
                                     f"{meta.get('format')!r}, this gptlab writes {RESUME_FORMAT}")
    try:
        load_model(model, str(folder / WEIGHTS))
        tensors = load_file(str(folder / "state.safetensors"))
        fields = {name: meta[name] for name in ResumeState.__dataclass_fields__}
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise GptlabError(f"{folder}: damaged resume checkpoint ({error}); delete the folder "
                          f"to start the run afresh") from None
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            per_param.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["optimizer_scalars"].items():
        per_param.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["optimizer_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")),
                       key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return ResumeState(**fields)
