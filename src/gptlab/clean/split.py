"""The split into train and validation text, by whole document or at a tail cut, and pass 2,
which writes the kept documents into the split files."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from gptlab.clean.documents import Facts, open_text, read_documents
from gptlab.clean.normalization import cleaned
from gptlab.errors import GptlabError
from gptlab.params import CleanParams


def joined_chars(docs: list[Facts]) -> int:
    """Length of the documents joined: each ending in a newline, separated by a blank line."""
    return sum(d.chars + (not d.ends_with_newline) for d in docs) + max(len(docs) - 1, 0)


def tail_cut(chars: int, val_fraction: float) -> int:
    """Where the last `val_fraction` of `chars` characters starts, exactly as nanoGPT splits."""
    cut = int(chars * (1 - val_fraction))
    if cut == 0 or cut == chars:
        raise GptlabError(f"clean.val_fraction: {val_fraction} leaves an empty split of a "
                          f"{chars}-character corpus")
    return cut


def split_documents(
    docs: list[Facts], val_fraction: float, seed: int
) -> tuple[list[Facts], list[Facts]]:
    """Assign whole documents to val, in a seeded random order, until val is closest to
    `val_fraction` of all characters; the rest is train."""
    if len(docs) < 2:
        raise GptlabError(f"clean.split: 'documents' needs at least 2 documents, got {len(docs)} "
                          f"(use split: tail for a single-file corpus)")
    order = sorted(docs, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(d.chars for d in docs)
    val_names: set[str] = set()
    val_chars = 0
    for doc in order:
        if len(val_names) == len(docs) - 1:
            break
        if abs(val_chars + doc.chars - target) < abs(val_chars - target):
            val_names.add(doc.name)
            val_chars += doc.chars
    if not val_names:  # every document alone overshoots: take the one nearest the target
        val_names.add(min(order, key=lambda d: abs(d.chars - target)).name)
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return sorted(train, key=lambda d: d.name), sorted(val, key=lambda d: d.name)


def write_splits(
    raw_dir: Path, params: CleanParams, facts: list[Facts], by_name: bool, cut: int | None,
    out_dir: Path, suffix: str = ".txt",
) -> None:
    """Pass 2: read and normalise the documents again, in the order of pass 1, and write each
    kept one into train.txt or val.txt (conversations: a line each of train.jsonl or
    val.jsonl); with a tail `cut`, the joined text is cut there."""
    with (open_text(out_dir / f"train{suffix}", "w") as train,
          open_text(out_dir / f"val{suffix}", "w") as val):
        if suffix == ".jsonl":
            writers = {"train": LineWriter(train.write), "val": LineWriter(val.write)}
        elif cut is None:
            writers = {"train": JoinedWriter(train.write), "val": JoinedWriter(val.write)}
        else:  # a tail split marks every kept document "train"
            writers = {"train": JoinedWriter(TailCut(train, val, cut).write)}
        for doc, fact in zip(read_documents(raw_dir, by_name), facts, strict=True):
            if not fact.split:
                continue
            text = cleaned(doc, params).text
            # The split was decided on pass 1's reading: a file changed since would break it.
            if doc.name != fact.name or len(text) != fact.chars:
                raise GptlabError(f"{raw_dir}: {doc.name} changed while the clean stage read it "
                                  f"twice; run the stage again")
            writers[fact.split].add(text)


class JoinedWriter:
    """Writes documents as one text: each ending in a newline, separated by one blank line."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write
        self.empty = True

    def add(self, text: str) -> None:
        if not self.empty:
            self.write("\n")
        self.write(text if text.endswith("\n") else text + "\n")
        self.empty = False


class LineWriter:
    """Writes documents of one line each (conversations) as JSON lines."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write

    def add(self, text: str) -> None:
        self.write(text + "\n")


class TailCut:
    """A text stream whose first `cut` characters go to `head` and the rest to `tail`."""

    def __init__(self, head: TextIO, tail: TextIO, cut: int) -> None:
        self.head, self.tail = head, tail
        self.head_left = cut

    def write(self, text: str) -> None:
        take = min(self.head_left, len(text))
        self.head.write(text[:take])
        self.tail.write(text[take:])
        self.head_left -= take
