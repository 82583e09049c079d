"""Resume state: what a training run needs to continue bit for bit, saved without pickle.

A run lives in `<runs>/<key>/`, where the key hashes everything the run's result depends on
(params, token files, number of processes, the training code), so a changed run never resumes
another's checkpoint. Each checkpoint is a folder of its own, `step-00000250/`, holding the
model and optimizer tensors and the RNG states as safetensors, everything else (step, batch
sampler state, log so far) as JSON, and a manifest of the files' sha256. The newest two are
kept: one damaged on disk (truncated, bytes flipped) is found by its checksums before any of
it is used, and the run falls back to the one before. Loading runs no code from the files.
The published weights are written apart, to models/ (gptlab.published).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from gptlab.distributed import World, gather_to_all
from gptlab.errors import GptlabError
from gptlab.imports import PACKAGE_DIR, gptlab_imports, module_file
from gptlab.io import atomic_dir, sha256_file, write_json
from gptlab.params import RunParams

# Version of the resume state's layout. The run key hashes this module's source, so another
# version writes to another run folder; one found all the same (a copied runs folder) is not
# used, like a damaged one.
RESUME_FORMAT = 5
WEIGHTS = "model.safetensors"
TENSORS = "state.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
# Checkpoints kept per run: the newest, and one to fall back to should it be damaged.
KEEP = 2
STEP_FOLDER = re.compile(r"^step-(\d{8})$")


class DamagedCheckpoint(GptlabError):
    """A resume checkpoint whose files are not those that were written."""

    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"{folder}: damaged resume checkpoint ({problem})")
        self.folder = folder


@dataclass(frozen=True)
class ResumeState:
    """Everything besides the model and optimizer that a run needs to continue bit for bit:
    the snapshot a checkpoint saves (the defaults are a run's start)."""

    step: int = 0
    batch_rng: dict[str, Any] = field(default_factory=dict)
    best_val_loss: float | None = None
    wall_seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)
    # Rank 0's unfinished log interval, as gptlab.train.LogInterval.state_dict() gives it.
    interval: dict[str, Any] = field(default_factory=dict)
    # The latest evaluation's mean losses ("train", "val"), for the published summary.
    last_eval: dict[str, float] = field(default_factory=dict)
    # The finished run's metrics, saved with its last checkpoint: a rerun of a finished run
    # republishes them as they were.
    metrics: dict[str, Any] | None = None
    # Under DDP, the batch and dropout generators and the log interval of ranks 1, 2, ...
    # (rank 0's are above).
    other_ranks: list[dict[str, Any]] = field(default_factory=list)

    def rank_interval(self, rank: int) -> dict[str, Any]:
        """Process `rank`'s unfinished log interval: each sums the losses of its own batches."""
        return self.interval if rank == 0 else self.other_ranks[rank - 1]["interval"]


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    folders = [path for path in run_dir.glob("step-*") if STEP_FOLDER.match(path.name)]
    return sorted(folders, key=lambda path: path.name, reverse=True)


def save_resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                state: ResumeState, device: torch.device) -> Path:
    """Write the checkpoint of `state.step` as a folder of its own in `run_dir`, then keep only
    the newest KEEP; return its folder."""
    folder = run_dir / f"step-{state.step:08d}"
    optimizer_state = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state(), **device_rng_state(device)}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    with atomic_dir(folder, "a resume checkpoint") as staging:
        save_model(model, str(staging / WEIGHTS))
        save_file(tensors, str(staging / TENSORS))
        write_json(staging / STATE, {
            "format": RESUME_FORMAT,
            **asdict(state),
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
        })
        # Checksums of what was written, so that damage on disk is found before it is used.
        write_json(staging / MANIFEST, {name: sha256_file(staging / name)
                                        for name in (WEIGHTS, TENSORS, STATE)})
    # Older checkpoints, and what a write killed midway left: one run writes at a time.
    for old in [*checkpoint_folders(run_dir)[KEEP:], *run_dir.glob(".step-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def device_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The training device's own generator (dropout on a GPU or on MPS), if it has one."""
    if device.type == "cuda":
        return {"rng.cuda": torch.cuda.get_rng_state(device)}
    if device.type == "mps":
        return {"rng.mps": torch.mps.get_rng_state()}
    return {}


def set_device_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    elif device.type == "mps" and "rng.mps" in tensors:
        torch.mps.set_rng_state(tensors["rng.mps"])


def verify_checkpoint(folder: Path) -> int:
    """Check every file of a checkpoint against its manifest, and its format; return the
    checkpoint's step.

    Reads and changes nothing else: a damaged checkpoint is refused before any of it is used.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(folder, f"manifest: {error}") from None
    if not isinstance(manifest, dict) or set(manifest) != {WEIGHTS, TENSORS, STATE}:
        raise DamagedCheckpoint(folder, "the manifest does not list the checkpoint's files")
    for name, digest in manifest.items():
        try:
            actual = sha256_file(folder / name)
        except OSError as error:
            raise DamagedCheckpoint(folder, f"{name}: {error.strerror}") from None
        if actual != digest:
            raise DamagedCheckpoint(folder, f"{name} is not the file that was written: sha256 "
                                            f"{actual[:12]}..., expected {str(digest)[:12]}...")
    found = json.loads((folder / STATE).read_text(encoding="utf-8")).get("format")
    if found != RESUME_FORMAT:
        raise DamagedCheckpoint(folder, f"format {found!r}, this gptlab reads {RESUME_FORMAT}")
    return int(STEP_FOLDER.match(folder.name)[1])


def load_resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> ResumeState:
    """Restore model, optimizer and RNG from a checkpoint folder that verify_checkpoint passed;
    return the rest of the run's state."""
    meta = json.loads((folder / STATE).read_text(encoding="utf-8"))
    try:
        fields = {name: meta[name] for name in ResumeState.__dataclass_fields__}
        load_model(model, str(folder / WEIGHTS))
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise DamagedCheckpoint(folder, str(error)) from None
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            per_param.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["optimizer_scalars"].items():
        per_param.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["optimizer_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    set_device_rng_state(tensors, device)
    return ResumeState(**fields)


def newest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[DamagedCheckpoint]]:
    """The newest checkpoint whose files pass their checksums, and the damaged ones newer than
    it (each a DamagedCheckpoint saying what is wrong)."""
    damaged = []
    for folder in checkpoint_folders(run_dir):
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint as error:
            damaged.append(error)
            continue
        return folder, damaged
    return None, damaged


def agree_on_checkpoint(folder: Path | None, run_dir: Path, world: World) -> None:
    """Refuse to start when the processes of a run found different checkpoints (several
    machines whose run folders are not the same shared storage)."""
    mine = None if folder is None else (folder.name, sha256_file(folder / MANIFEST))
    found = gather_to_all(mine, world)
    for rank, theirs in enumerate(found):
        if theirs != found[0]:
            names = [entry[0] if entry else "none" for entry in (found[0], theirs)]
            raise GptlabError(f"{run_dir}: process {rank} finds resume checkpoint {names[1]}, "
                              f"process 0 finds {names[0]}; every process must see the same "
                              f"runs folder (run from shared storage)")


def run_key(params: RunParams, tokens_meta: dict[str, Any], world_size: int = 1) -> str:
    """Hash of everything a run's result depends on: a changed param, token file, number of
    processes or line of training code starts a fresh run (a checkpoint of other code must not
    be resumed)."""
    depends_on = {"seed": params.seed, "model": params.model.model_dump(),
                  "train": params.train.model_dump(), "tokens": tokens_meta,
                  "code": code_fingerprint("gptlab.train"), "world_size": world_size}
    return hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:16]


def code_fingerprint(module: str, package: Path = PACKAGE_DIR) -> str:
    """Hash of a gptlab module's source and of every gptlab module it imports, each with its
    path in the package (a module moved elsewhere is other code)."""
    digest = hashlib.sha256()
    root = module_file(module, package)
    for source in sorted({root, *gptlab_imports(root, package)}):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def rank_state(batch_rng: np.random.Generator, device: torch.device,
               interval: dict[str, Any]) -> dict[str, Any]:
    """What a process other than rank 0 needs to continue its own streams and log interval
    after a resume."""
    state = {"batch_rng": batch_rng.bit_generator.state,
             "torch_rng": torch.get_rng_state().tolist(),
             "interval": interval}
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
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    if "cuda_rng" in mine:
        torch.cuda.set_rng_state(torch.tensor(mine["cuda_rng"], dtype=torch.uint8), device)
