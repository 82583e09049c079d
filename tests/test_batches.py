"""Training batches: shifted windows inside one shard, replayable from the generator's state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_corpus, write_tokens

from gptlab.batches import RandomWindows, batch_seed, open_training_splits
from gptlab.errors import GptlabError
from gptlab.tokens import read_meta

CPU = torch.device("cpu")


def test_random_windows_are_shifted_pairs_replayable_from_saved_state():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = RandomWindows([tokens], block_size=8, batch_size=4, seed=7)
    inputs, targets = windows.next(CPU)
    assert inputs.shape == targets.shape == (4, 8) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)  # on arange, the target is the next token
    saved = windows.rng.bit_generator.state
    expected = windows.next(CPU)
    replay = RandomWindows([tokens], block_size=8, batch_size=4, seed=999)
    replay.rng.bit_generator.state = saved
    assert all(torch.equal(a, b) for a, b in zip(replay.next(CPU), expected, strict=True))
    assert int(inputs.max()) < 1000 - 1


def test_windows_never_cross_shards_and_reach_every_shard():
    # Shards of different ranges: a window that crossed two would break the +1 pattern.
    shards = [np.arange(0, 100, dtype=np.uint16), np.arange(1000, 1050, dtype=np.uint16),
              np.arange(2000, 2300, dtype=np.uint16)]
    windows = RandomWindows(shards, block_size=10, batch_size=64, seed=1)
    seen = set()
    for _ in range(20):
        inputs, targets = windows.next(CPU)
        assert torch.equal(targets, inputs + 1)
        seen.update((inputs[:, 0] // 1000).tolist())
    assert seen == {0, 1, 2}


def test_each_rank_draws_its_own_stream_and_rank_zero_the_single_process_one():
    assert batch_seed(1337, 0) == 1337
    tokens = np.arange(10_000, dtype=np.uint16)
    draws = [RandomWindows([tokens], 8, 4, batch_seed(1337, rank)).next(CPU)[0]
             for rank in (0, 1, 2)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_a_block_size_as_long_as_a_split_is_refused(tmp_path):
    tokens_dir = write_tokens(tmp_path, make_corpus(300))
    meta = read_meta(tokens_dir, ["train_shards", "val_shards", "train_tokens", "val_tokens"])
    assert len(open_training_splits(tokens_dir, meta, 16)["val"]) == 1
    with pytest.raises(GptlabError, match=r"model\.block_size: 30 is not shorter than the val "
                                          r"split's longest shard \(30 tokens\)"):
        open_training_splits(tokens_dir, meta, 30)
