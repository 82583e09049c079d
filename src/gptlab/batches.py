"""Training batches: random windows of the token shards, from a generator whose state is saved
with every checkpoint, so a resumed run draws exactly the batches an uninterrupted one would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokens import open_split

SPLITS = ("train", "val")


def open_training_splits(tokens_dir: Path, meta: dict[str, Any],
                         block_size: int) -> dict[str, list[np.ndarray]]:
    """Both splits' shards, each refused unless some shard is longer than a window."""
    splits = {name: open_split(tokens_dir, name, meta) for name in SPLITS}
    for name, shards in splits.items():
        longest = max(len(shard) for shard in shards)
        if longest <= block_size:
            raise GptlabError(f"model.block_size: {block_size} is not shorter than the {name} "
                              f"split's longest shard ({longest} tokens); lower it or add data")
    return splits


class RandomWindows:
    """Random (input, target) windows of a split's token shards, from a generator whose state
    is saved.

    Every window lies inside one shard, and every window of every shard is equally likely: a
    start is drawn over all shards' windows at once, so with one shard the draws are exactly
    those of a single token file.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int,
                 seed: int | list[int]) -> None:
        self.shards = shards
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        windows = [max(0, len(shard) - block_size) for shard in shards]
        self._first_window = np.cumsum([0, *windows])

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, self._first_window[-1], size=self.batch_size)
        shard_of = np.searchsorted(self._first_window, starts, side="right") - 1
        rows = [self.shards[s][o : o + self.block_size + 1]
                for s, o in zip(shard_of, starts - self._first_window[shard_of], strict=True)]
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        if device.type == "cuda":
            # Pinned memory lets the copy overlap with the previous step's kernels.
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
        return window[:, :-1], window[:, 1:]


def batch_seed(seed: int, rank: int) -> int | list[int]:
    """Each process's own batch stream; rank 0 keeps the single-process stream, so a world of
    one trains exactly as before there were several."""
    return seed if rank == 0 else [seed, rank]
