"""The leak check: the fraction of the validation text's 13-word shingles that the training
text also holds, both read in chunks so that neither need fit in memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

import numpy as np

from gptlab.clean.dedupe import fold_words, shingle_hashes

# Words per shingle of the leak check, as in the GPT-3 paper's contamination analysis.
LEAK_SHINGLE_WORDS = 13
# The leak check holds at most this many validation shingles (8 MB of hashes): past it, the
# ones with the smallest hashes, a uniform random sample, so the fraction is an estimate with a
# standard error under 0.0005. The default corpus has about 100,000: it is measured exactly.
LEAK_MAX_VAL_SHINGLES = 1_000_000
# Characters of text the leak check folds into words at a time: about 15 MB of word lists.
LEAK_CHUNK_CHARS = 1 << 19


def leak_fraction(
    train: TextIO, val: TextIO, chunk_chars: int = LEAK_CHUNK_CHARS,
    max_val_shingles: int = LEAK_MAX_VAL_SHINGLES,
) -> float:
    """Fraction of validation 13-word shingles that also occur in the training text.

    Words are spelling-folded as for near-dedupe, so a validation play whose other edition is
    in the training set counts as leaked even where the spelling differs. Both texts are read
    in chunks; of a validation text with more than `max_val_shingles` distinct shingles, a
    uniform sample of that many is checked.
    """
    val_hashes = smallest_shingle_hashes(val, max_val_shingles, chunk_chars)
    if len(val_hashes) == 0:
        return 0.0
    found = np.zeros(len(val_hashes), dtype=bool)
    for hashes in chunk_shingle_hashes(train, LEAK_SHINGLE_WORDS, chunk_chars):
        positions, present = sorted_lookup(val_hashes, hashes)
        found[positions[present]] = True
    return int(found.sum()) / len(val_hashes)


def smallest_shingle_hashes(text: TextIO, count: int, chunk_chars: int) -> np.ndarray:
    """The `count` smallest distinct 13-word shingle hashes of a text, sorted: all of them for a
    shorter text, else a uniform random sample, since the hashes are pseudo-random."""
    smallest = np.zeros(0, dtype=np.uint64)
    for hashes in chunk_shingle_hashes(text, LEAK_SHINGLE_WORDS, chunk_chars):
        if len(smallest) == count:
            hashes = hashes[hashes < smallest[-1]]  # the others cannot be among the smallest
        # Inserted in place rather than merged and sorted: one copy of `smallest`, not three.
        positions, present = sorted_lookup(smallest, hashes)
        smallest = np.insert(smallest, positions[~present], hashes[~present])[:count]
    return smallest


def sorted_lookup(table: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `values`, where it is (or would go) in the sorted `table`, and whether it is
    there."""
    positions = np.searchsorted(table, values)
    present = np.zeros(len(values), dtype=bool)
    inside = positions < len(table)
    present[inside] = table[positions[inside]] == values[inside]
    return positions, present


def chunk_shingle_hashes(text: TextIO, n: int, chunk_chars: int) -> Iterator[np.ndarray]:
    """The hashes of the text's n-word shingles (spelling-folded), one array per chunk of text;
    together they are exactly the shingles of the whole text."""
    carry: list[str] = []
    for chunk in word_aligned_chunks(text, chunk_chars):
        words = carry + fold_words(chunk)
        yield shingle_hashes(words, n)
        # The last n-1 words start shingles that end in the next chunk.
        carry = words[max(len(words) - n + 1, 0) :]


def word_aligned_chunks(text: TextIO, chunk_chars: int) -> Iterator[str]:
    """The text in pieces of about `chunk_chars` characters, each ending after a space or a
    newline, so that no word (and no word-folding step) spans two pieces."""
    rest = ""
    while block := text.read(chunk_chars):
        block = rest + block
        end = max(block.rfind(" "), block.rfind("\n")) + 1
        rest = block[end:]
        if end:
            yield block[:end]
    if rest:
        yield rest
