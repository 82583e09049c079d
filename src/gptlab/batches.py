"""Training batches: random windows of the token shards, from a generator whose state is saved
with every checkpoint, so a resumed run draws exactly the batches an uninterrupted one would.

Conversations (token files with loss masks) are drawn differently: every window starts where a
conversation starts, and holds it and whatever conversations follow it in the shard (packed),
padded past the shard's end; the loss counts the assistant tokens only, every other target
being IGNORE, which cross-entropy skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.chat import COUNTED, START
from gptlab.errors import GptlabError
from gptlab.tokens import open_masks, open_split

SPLITS = ("train", "val")
# The target cross-entropy leaves out (torch's default ignore_index).
IGNORE = -100


def open_training_splits(tokens_dir: Path, meta: dict[str, Any],
                         block_size: int) -> dict[str, list[np.ndarray]]:
    """Both splits' shards, each refused unless some shard is longer than a window (windows of
    conversations are padded instead)."""
    splits = {name: open_split(tokens_dir, name, meta) for name in SPLITS}
    if meta.get("loss_mask"):
        return splits
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


class ConversationWindows:
    """Random windows of a split's conversations, each starting at a conversation's first token,
    with the targets the loss does not count set to IGNORE; drawn like RandomWindows, from a
    generator whose state is saved. Every conversation is equally likely to start a window."""

    def __init__(self, shards: list[np.ndarray], masks: list[np.ndarray], block_size: int,
                 batch_size: int, seed: int | list[int], split: str) -> None:
        self.shards, self.masks = shards, masks
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.starts = [(s, int(o)) for s, mask in enumerate(masks)
                       for o in np.flatnonzero(np.asarray(mask) & START)]
        if not self.starts:
            raise GptlabError(f"the {split} split has no conversation (rerun the tokenize stage)")
        for s, o in self.starts:
            if not (self.window(s, o)[1] != IGNORE).any():
                raise GptlabError(f"model.block_size: {block_size} tokens hold no assistant "
                                  f"token of the {split} split's conversation at token {o}; "
                                  f"raise it or shorten the conversation's first turns")

    def window(self, shard: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """block_size + 1 token ids from `offset`, padded with 0, and the targets' loss mask
        applied: (ids, targets) with targets[i] the target of ids[i]."""
        size = self.block_size + 1
        ids = np.zeros(size, dtype=np.int64)
        mask = np.zeros(size, dtype=np.uint8)
        piece = self.shards[shard][offset : offset + size]
        ids[: len(piece)] = piece
        mask[: len(piece)] = self.masks[shard][offset : offset + size]
        targets = np.where(mask[1:] & COUNTED, ids[1:], IGNORE)
        return ids[:-1], targets

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self.rng.integers(0, len(self.starts), size=self.batch_size)
        rows = [self.window(*self.starts[i]) for i in picks]
        inputs = torch.from_numpy(np.stack([row[0] for row in rows])).to(device)
        targets = torch.from_numpy(np.stack([row[1] for row in rows])).to(device)
        return inputs, targets


def split_windows(tokens_dir: Path, meta: dict[str, Any], split: str, shards: list[np.ndarray],
                  block_size: int, batch_size: int,
                  seed: int | list[int]) -> RandomWindows | ConversationWindows:
    """The windows training draws from a split: of conversations where it has loss masks, of
    plain text otherwise."""
    masks = open_masks(tokens_dir, split, meta, shards)
    if masks is None:
        return RandomWindows(shards, block_size, batch_size, seed)
    return ConversationWindows(shards, masks, block_size, batch_size, seed, split)


def batch_seed(seed: int, rank: int) -> int | list[int]:
    """Each process's own batch stream; rank 0 keeps the single-process stream, so a world of
    one trains exactly as before there were several."""
    return seed if rank == 0 else [seed, rank]
