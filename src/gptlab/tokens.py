"""Token files: a small fixed header, then token ids, read back through numpy.memmap.

Each split is one or more numbered shards (train_000000.bin, train_000001.bin, ...), each a
token file of its own, so corpora larger than memory are written and read piece by piece.

Layout (little-endian, 64-byte header):
    magic "GPTLABTK" | format version u32 | bytes per token u32 (2 or 4) | token count u64 |
    vocabulary size u64 | tokenizer fingerprint (8 bytes) | zero padding
The header lets a reader refuse a truncated file, a foreign file, or tokens written by another
tokenizer, instead of training on garbage.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, peak_rss_mb, write_json
from gptlab.tokenizers import (
    TEXT_CHUNK_CHARS,
    Tokenizer,
    split_at_lines,
    tokenizer_from_definition,
)

MAGIC = b"GPTLABTK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ8s")
# Bytes of text one worker encodes per task: large enough that handing results back costs
# little next to encoding, small enough that the tasks in flight hold a few tens of MB.
RANGE_BYTES = 4 << 20
# Token ids moved from a range's scratch file into the shards at a time.
COPY_BLOCK_TOKENS = 1 << 20


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


@dataclass(frozen=True)
class EncodeStats:
    tokens: int
    chars: int
    bytes: int
    seconds: float
    shards: int
    workers: int  # processes that encoded (1: this one; small files are not worth more)
    worker_peak_rss_mb: float  # the largest resident size of any encoding process


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond: half the disk and memory for most tokenizers."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_path(tokens_dir: Path, split: str, index: int) -> Path:
    return tokens_dir / f"{split}_{index:06d}.bin"


def encode_file(tokenizer: Tokenizer, text_path: Path, out_dir: Path, split: str,
                shard_tokens: int, workers: int | None = None) -> EncodeStats:
    """Encode a text file of any size into numbered token shards of `out_dir`.

    The file is cut at line breaks into ranges of RANGE_BYTES that worker processes (one per
    core unless `workers` says otherwise) read, encode, and write to a scratch file each; the
    ranges are appended to the shards in file order, so the shards do not depend on the number
    of workers. At most one range per worker and one more are in flight, and ids pass through
    this process a block at a time, so no process's memory grows with the file.
    """
    ranges = text_ranges(text_path, RANGE_BYTES)
    workers = min(workers or available_cpus(), max(1, len(ranges)))
    size = text_path.stat().st_size
    start = time.perf_counter()
    chars, peak_rss = 0, 0.0
    scratch = [out_dir / f".{split}-range-{index:06d}.tmp" for index in range(len(ranges))]
    try:
        with ShardWriter(out_dir, split, tokenizer, shard_tokens) as writer, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"encode {text_path.name}",
            disable=None, file=sys.stderr,
        ) as progress:
            for encoded in _encoded_ranges(tokenizer, text_path, ranges, scratch, workers):
                writer.append_file(encoded.scratch)
                encoded.scratch.unlink()
                chars += encoded.chars
                peak_rss = max(peak_rss, encoded.peak_rss_mb)
                progress.update(encoded.bytes)
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return EncodeStats(writer.count, chars, size, seconds, writer.shards, workers, peak_rss)


def encode_splits(tokenizer: Tokenizer, texts: dict[str, Path], out_dir: Path,
                  shard_tokens: int, workers: int | None = None) -> dict[str, EncodeStats]:
    """Write a token folder: tokenizer.json, each split's token shards, and meta.json describing
    them (later stages read the split sizes from it, e.g. bytes for bits per byte)."""
    tokenizer.save(out_dir / "tokenizer.json")
    stats = {split: encode_file(tokenizer, path, out_dir, split, shard_tokens, workers)
             for split, path in texts.items()}
    write_json(out_dir / "meta.json", {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "shard_tokens": shard_tokens,
        **{f"{split}_{field}": getattr(s, field)
           for split, s in stats.items() for field in ("tokens", "chars", "bytes", "shards")},
    })
    return stats


def available_cpus() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def text_ranges(path: Path, range_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte offsets covering the file, each about `range_bytes` long and ending
    just after a line break (or at the end of the file), so no character or word is split."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + range_bytes < size:
            f.seek(bounds[-1] + range_bytes)
            cut = _after_next_line_break(f)
            if cut >= size:
                break
            bounds.append(cut)
    bounds.append(size)
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _after_next_line_break(f: BinaryIO) -> int:
    """Offset just past the next newline at or after the file's position (the end if none)."""
    while block := f.read(1 << 16):
        newline = block.find(b"\n")
        if newline >= 0:
            return f.tell() - len(block) + newline + 1
    return f.tell()


@dataclass(frozen=True)
class EncodedRange:
    scratch: Path  # the range's token ids, raw, in the split's dtype
    chars: int
    bytes: int
    peak_rss_mb: float  # of the process that encoded it


def _encoded_ranges(tokenizer: Tokenizer, text_path: Path, ranges: list[tuple[int, int]],
                    scratch: list[Path], workers: int) -> Iterator[EncodedRange]:
    """Each range encoded into its scratch file, yielded in file order."""
    tasks = list(zip(ranges, scratch, strict=True))
    if workers <= 1:  # not worth starting processes for: the tokenizer's threads instead
        _start_worker(tokenizer.to_json(), str(text_path), threaded=True)
        yield from (_encode_range(task) for task in tasks)
        return
    # spawn, not fork: a forked child of a process that has run the tokenizers' thread pools
    # can deadlock, and a fresh interpreter's resident size is the worker's own.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, context, _start_worker,
                                 (tokenizer.to_json(), str(text_path))) as pool:
            in_flight: collections.deque = collections.deque()
            for task in tasks:
                in_flight.append(pool.submit(_encode_range, task))
                if len(in_flight) > workers:  # every worker busy, one result waiting: no more
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
    except BrokenProcessPool:  # a worker killed (out of memory, say): fail, never wait forever
        raise GptlabError(f"{text_path}: a tokenizer worker process died (out of memory?); "
                          f"rerun the tokenize stage") from None


_worker: dict[str, Any] = {}


def _start_worker(tokenizer_definition: dict[str, Any], text_path: str,
                  threaded: bool = False) -> None:
    _worker["tokenizer"] = tokenizer_from_definition(tokenizer_definition)
    _worker["text_path"] = text_path
    # One process per core already uses every core: threads on top would only contend.
    _worker["threaded"] = threaded


def _encode_range(task: tuple[tuple[int, int], Path]) -> EncodedRange:
    """Encode one byte range of the worker's text file, in line-aligned pieces."""
    tokenizer: Tokenizer = _worker["tokenizer"]
    path, ((start, end), scratch) = _worker["text_path"], task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GptlabError(f"{path}: not valid UTF-8 at byte offset {start + error.start}"
                          ) from None
    del data
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    pieces = list(split_at_lines(text, TEXT_CHUNK_CHARS))
    try:
        encoded = (tokenizer.encode_batch(pieces) if _worker["threaded"]
                   else map(tokenizer.encode, pieces))
        with open(scratch, "wb") as out:
            for ids in encoded:
                out.write(ids.astype(dtype).tobytes())
    except GptlabError as error:
        raise GptlabError(f"{path}: {error}") from None
    return EncodedRange(scratch, len(text), end - start, peak_rss_mb())


class ShardWriter:
    """Token ids of one split, written into numbered shards of at most `shard_tokens` ids.

    A split always has at least one shard (an empty split, one empty shard), and a shard is
    started only when there are ids for it, so no empty shard trails a full one. An error
    removes the shards already finished: a split is written whole or not at all.
    """

    def __init__(self, out_dir: Path, split: str, tokenizer: Tokenizer, shard_tokens: int) -> None:
        self.out_dir, self.split, self.tokenizer = out_dir, split, tokenizer
        self.shard_tokens = shard_tokens
        self.shards = 0
        self.count = 0

    def __enter__(self) -> ShardWriter:
        self._open_next()
        return self

    def _open_next(self) -> None:
        self._current = TokenWriter(shard_path(self.out_dir, self.split, self.shards),
                                    self.tokenizer.vocab_size, self.tokenizer.fingerprint)
        self._current.__enter__()
        self.shards += 1

    def append_file(self, path: Path) -> None:
        """Append the raw ids of a file in this split's dtype, a block at a time."""
        dtype = dtype_for_vocab(self.tokenizer.vocab_size)
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
    """meta.json of a token folder, refused unless each `required` key is a positive count."""
    path = tokens_dir / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (run the tokenize stage first)") from None
    except (OSError, ValueError) as error:
        raise GptlabError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise GptlabError(f"{path}: expected a JSON object (rerun the tokenize stage)")
    bad = [key for key in required if not (isinstance(meta.get(key), int) and meta[key] > 0)]
    if bad:
        raise GptlabError(f"{path}: missing or not a positive count: {', '.join(bad)} (rerun "
                          f"the tokenize stage)")
    return meta


def open_split(tokens_dir: Path, split: str, tokenizer: Tokenizer,
               meta: dict[str, Any]) -> list[np.memmap]:
    """Memory maps of a split's shards, checked against the tokenizer and against the counts
    in meta.json (read with `read_meta`, requiring `<split>_shards` and `<split>_tokens`)."""
    shards = [open_tokens(shard_path(tokens_dir, split, index), tokenizer)
              for index in range(meta[f"{split}_shards"])]
    count = sum(len(shard) for shard in shards)
    if count != meta[f"{split}_tokens"]:
        raise GptlabError(f"{tokens_dir / (split + '_*.bin')}: the shards hold {count} tokens "
                          f"but {tokens_dir / 'meta.json'} says {meta[f'{split}_tokens']} "
                          f"(rerun the tokenize stage)")
    return shards


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


def open_tokens(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> np.memmap:
    """Memory-map a token file read-only; with `tokenizer`, refuse tokens written by another."""
    header = read_header(path)
    if tokenizer is not None and header.tokenizer_fingerprint != tokenizer.fingerprint[:16]:
        raise GptlabError(f"{path}: written by another tokenizer (fingerprint "
                          f"{header.tokenizer_fingerprint}, expected {tokenizer.fingerprint}); "
                          f"rerun the tokenize stage")
    if header.count == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES,
                     shape=(header.count,))
