"""Resume state: what a training run needs to continue bit for bit, saved without pickle.

A run lives in `<runs>/<key>/checkpoint/`, where the key hashes everything the run's result
depends on (params, token files, number of processes, the training code), so a changed run
never resumes another's checkpoint. The model and optimizer tensors and the RNG states are
safetensors; everything else (step, batch sampler state, log so far) is JSON. Loading runs no
code from the files. The published weights are written apart, to models/ (gptlab.published).
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from gptlab.distributed import World
from gptlab.errors import GptlabError
from gptlab.io import atomic_dir, write_json
from gptlab.params import RunParams

# Version of the resume state's layout; a run finding an older one starts afresh.
RESUME_FORMAT = 3
WEIGHTS = "model.safetensors"
PACKAGE_DIR = Path(__file__).resolve().parent


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


def run_key(params: RunParams, tokens_meta: dict[str, Any], world_size: int = 1) -> str:
    """Hash of everything a run's result depends on: a changed param, token file, number of
    processes or line of training code starts a fresh run (a checkpoint of other code must not
    be resumed)."""
    depends_on = {"seed": params.seed, "model": params.model.model_dump(),
                  "train": params.train.model_dump(), "tokens": tokens_meta,
                  "code": code_fingerprint("gptlab.train"), "world_size": world_size}
    return hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:16]


def code_fingerprint(module: str) -> str:
    """Hash of a gptlab module's source and of every gptlab module it imports."""
    digest = hashlib.sha256()
    root = module_file(module)
    for source in sorted({root, *gptlab_imports(root)}):
        digest.update(source.relative_to(PACKAGE_DIR).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def gptlab_imports(source: Path) -> set[Path]:
    """The source files of the gptlab modules a Python file imports, directly or through other
    gptlab modules: the code it runs (the train stage's DVC deps, say)."""
    found: set[Path] = set()
    pending = [source]
    while pending:
        for name in imported_modules(pending.pop()):
            path = module_file(name)
            if path not in found:
                found.add(path)
                pending.append(path)
    return found


def imported_modules(source: Path) -> set[str]:
    """Names of the gptlab modules a file imports (`import gptlab.x`, `from gptlab.x import y`,
    `from gptlab import x`), wherever in the file the import is."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "gptlab":
            names.update(f"gptlab.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name for name in names if name.startswith("gptlab.") and module_file(name).exists()}


def module_file(name: str) -> Path:
    """The source file of gptlab module `name`: a module file, or a package's __init__.py."""
    path = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def rank_state(batch_rng: np.random.Generator, device: torch.device,
               interval_loss_sum: float) -> dict[str, Any]:
    """What a process other than rank 0 needs to continue its own streams after a resume."""
    state = {"batch_rng": batch_rng.bit_generator.state,
             "torch_rng": torch.get_rng_state().tolist(),
             "interval_loss_sum": interval_loss_sum}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rank_state(state: ResumeState, world: World, batch_rng: np.random.Generator,
                       device: torch.device) -> None:
    """Put this process's streams where the checkpoint left them (rank 0's are in `state`
    itself and already restored by load_resume)."""
    if world.rank == 0:
        batch_rng.bit_generator.state = state.batch_rng
        return
    if len(state.other_ranks) != world.size - 1:
        raise GptlabError(f"resume checkpoint of {len(state.other_ranks) + 1} processes, this "
                          f"run has {world.size}; delete .gptlab/runs to start afresh")
    mine = state.other_ranks[world.rank - 1]
    batch_rng.bit_generator.state = mine["batch_rng"]
    state.interval_loss_sum = mine["interval_loss_sum"]
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    if "cuda_rng" in mine:
        torch.cuda.set_rng_state(torch.tensor(mine["cuda_rng"], dtype=torch.uint8), device)
