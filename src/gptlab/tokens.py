"""Token files: a small fixed header, then token ids, read back through numpy.memmap.

Each split is one or more numbered shards (train_000000.bin, train_000001.bin, ...), each a
token file of its own, so corpora larger than memory are written and read piece by piece.

Layout (little-endian, 64-byte header):
    magic "GPTLABTK" | format version u32 | bytes per token u32 (2 or 4) | token count u64 |
    vocabulary size u64 | tokenizer fingerprint (8 bytes) | zero padding
The header lets a reader refuse a truncated file, a foreign file, or tokens written by another
tokenizer, instead of training on garbage. Beside the shards, meta.json names the tokenizer
(kind, vocabulary size, fingerprint) and counts each split's shards, tokens, characters and
bytes, so readers need no tokenizer. gptlab.encode writes the files; this module is their
format, and imports neither torch nor a tokenizer.

Conversations (meta.json's "loss_mask" says which targets the loss counts) have beside each
shard a mask shard of the same length, train_mask_000000.bin, in the same format with a
"vocabulary" of the MASK_VALUES bit combinations of gptlab.chat (the loss counts this token as
a target; a conversation starts here), written with the same fingerprint: a mask is refused
unless it belongs to its shard.

This module owns the folder's file names: every other module asks `shard_path`, `meta_path` and
`tokenizer_path` for them.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.io import atomic_path

MAGIC = b"GPTLABTK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ8s")
# Token ids moved from a range's scratch file into the shards at a time.
COPY_BLOCK_TOKENS = 1 << 20
# The files of a token folder besides the shards.
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer that wrote the shards (Tokenizer.save)
SHARD_SUFFIX = ".bin"


@dataclass(frozen=True)
class TokenHeader:
    version: int
    itemsize: int
    count: int
    vocab_size: int
    tokenizer_fingerprint: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.itemsize}")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond: half the disk and memory for most tokenizers."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# The values a mask shard may hold: every combination of gptlab.chat's two mask bits.
MASK_VALUES = 4


def mask_split(split: str) -> str:
    """The name under which a split's mask shards are written."""
    return f"{split}_mask"


def shard_path(tokens_dir: Path, split: str, index: int) -> Path:
    return tokens_dir / f"{split}_{index:06d}{SHARD_SUFFIX}"


def shards_pattern(tokens_dir: Path, split: str) -> Path:
    """A split's shards as one glob pattern, the way a message names them all."""
    return tokens_dir / f"{split}_*{SHARD_SUFFIX}"


def meta_path(tokens_dir: Path) -> Path:
    return tokens_dir / META_FILE


def tokenizer_path(tokens_dir: Path) -> Path:
    return tokens_dir / TOKENIZER_FILE


class ShardWriter:
    """Token ids of one split, written into numbered shards of at most `shard_tokens` ids.

    A split always has at least one shard (an empty split, one empty shard), and a shard is
    started only when there are ids for it, so no empty shard trails a full one. An error
    removes the shards already finished: a split is written whole or not at all.
    """

    def __init__(self, out_dir: Path, split: str, vocab_size: int, tokenizer_fingerprint: str,
                 shard_tokens: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.vocab_size, self.fingerprint = vocab_size, tokenizer_fingerprint
        self.shard_tokens = shard_tokens
        self.shards = 0
        self.count = 0

    def __enter__(self) -> ShardWriter:
        self._open_next()
        return self

    def _open_next(self) -> None:
        self._current = TokenWriter(shard_path(self.out_dir, self.split, self.shards),
                                    self.vocab_size, self.fingerprint)
        self._current.__enter__()
        self.shards += 1

    def append_file(self, path: Path) -> None:
        """Append the raw ids of a file in this split's dtype, a block at a time."""
        dtype = dtype_for_vocab(self.vocab_size)
        with open(path, "rb") as f:
            while len(block := np.fromfile(f, dtype=dtype, count=COPY_BLOCK_TOKENS)):
                self.write(block)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            room = self.shard_tokens - self._current.count
            if room == 0:
                self._current.__exit__(None, None, None)
                self._open_next()
                continue
            self._current.write(ids[:room])
            self.count += min(room, len(ids))
            ids = ids[room:]

    def __exit__(self, *exc_info: object) -> None:
        self._current.__exit__(*exc_info)
        if exc_info[0] is not None:
            for index in range(self.shards - 1):
                shard_path(self.out_dir, self.split, index).unlink(missing_ok=True)


def read_meta(tokens_dir: Path, required: list[str]) -> dict[str, Any]:
    """meta.json of a token folder, refused unless it names its tokenizer (vocabulary size and
    fingerprint) and each `required` key is a positive count."""
    path = meta_path(tokens_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (run the tokenize stage first)") from None
    except (OSError, ValueError) as error:
        raise GptlabError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise GptlabError(f"{path}: expected a JSON object (rerun the tokenize stage)")
    bad = [key for key in ["vocab_size", *required]
           if not (isinstance(meta.get(key), int) and meta[key] > 0)]
    if not isinstance(meta.get("tokenizer_fingerprint"), str):
        bad.append("tokenizer_fingerprint")
    if bad:
        raise GptlabError(f"{path}: missing or not a positive count: {', '.join(bad)} (rerun "
                          f"the tokenize stage)")
    return meta


def open_split(tokens_dir: Path, split: str, meta: dict[str, Any]) -> list[np.memmap]:
    """Memory maps of a split's shards, checked against the tokenizer and the counts in
    meta.json (read with `read_meta`, requiring `<split>_shards` and `<split>_tokens`)."""
    shards = [open_tokens(shard_path(tokens_dir, split, index), meta["tokenizer_fingerprint"])
              for index in range(meta[f"{split}_shards"])]
    count = sum(len(shard) for shard in shards)
    if count != meta[f"{split}_tokens"]:
        raise GptlabError(f"{shards_pattern(tokens_dir, split)}: the shards hold {count} tokens "
                          f"but {meta_path(tokens_dir)} says {meta[f'{split}_tokens']} "
                          f"(rerun the tokenize stage)")
    return shards


def open_masks(tokens_dir: Path, split: str, meta: dict[str, Any],
               shards: list[np.ndarray]) -> list[np.ndarray] | None:
    """The loss masks of a split's `shards` (see `open_split`), each checked to be as long as
    its shard; None for token files of plain text."""
    if not meta.get("loss_mask"):
        return None
    masks = [open_tokens(shard_path(tokens_dir, mask_split(split), index),
                         meta["tokenizer_fingerprint"]) for index in range(len(shards))]
    for index, (mask, shard) in enumerate(zip(masks, shards, strict=True)):
        if len(mask) != len(shard):
            raise GptlabError(f"{shard_path(tokens_dir, mask_split(split), index)}: {len(mask)} "
                              f"mask values for {len(shard)} tokens (rerun the tokenize stage)")
    return masks


class TokenWriter:
    """Append token ids to a new token file; it appears under its name only when closed cleanly."""

    def __init__(self, path: Path, vocab_size: int, tokenizer_fingerprint: str) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.fingerprint = tokenizer_fingerprint
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0

    def __enter__(self) -> TokenWriter:
        self._atomic = atomic_path(self.path)
        self._file = open(self._atomic.__enter__(), "wb")  # closed in __exit__
        self._file.write(bytes(HEADER_BYTES))
        return self

    def write(self, ids: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise GptlabError(f"{self.path}: token id {int(ids[bad.argmax()])} outside the "
                              f"vocabulary of {self.vocab_size}")
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.count += len(ids)

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self._file.seek(0)
                self._file.write(_pack_header(self.count, self.vocab_size, self.dtype,
                                              self.fingerprint))
        finally:
            self._file.close()
            self._atomic.__exit__(*exc_info)


def _pack_header(count: int, vocab_size: int, dtype: np.dtype, fingerprint: str) -> bytes:
    packed = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count, vocab_size,
                          bytes.fromhex(fingerprint)[:8].ljust(8, b"\0"))
    return packed.ljust(HEADER_BYTES, b"\0")


def read_header(path: str | os.PathLike) -> TokenHeader:
    """Parse and check a token file's header against the file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (run the tokenize stage first)") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise GptlabError(f"{path}: not a gptlab token file (no {MAGIC.decode()} header)")
    _, version, itemsize, count, vocab_size, fingerprint = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise GptlabError(f"{path}: token file format version {version}, this gptlab reads "
                          f"{FORMAT_VERSION} (rerun the tokenize stage)")
    if itemsize not in (2, 4):
        raise GptlabError(f"{path}: damaged header ({itemsize} bytes per token)")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise GptlabError(f"{path}: {state}: header says {count} tokens ({expected} bytes), "
                          f"file has {size} bytes (rerun the tokenize stage)")
    return TokenHeader(version, itemsize, count, vocab_size, fingerprint.hex())


def open_tokens(path: str | os.PathLike, tokenizer_fingerprint: str | None = None) -> np.memmap:
    """Memory-map a token file read-only; with a fingerprint, refuse tokens written by another
    tokenizer."""
    header = read_header(path)
    if (tokenizer_fingerprint is not None
            and header.tokenizer_fingerprint != tokenizer_fingerprint[:16]):
        raise GptlabError(f"{path}: written by another tokenizer (fingerprint "
                          f"{header.tokenizer_fingerprint}, expected {tokenizer_fingerprint}); "
                          f"rerun the tokenize stage")
    if header.count == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES,
                     shape=(header.count,))
