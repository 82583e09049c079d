"""Encoding text into token shards, in parallel: the work of the tokenize stage.

A text file of any size is cut at line breaks into ranges that worker processes encode side by
side; the ranges' ids are appended to the split's shards in file order (see gptlab.tokens for
the files themselves), so the shards are the same whatever the number of workers.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from gptlab.chat import encode_conversation, read_conversations, render
from gptlab.errors import GptlabError
from gptlab.io import peak_rss_mb, write_json
from gptlab.tokenizers import (
    TEXT_CHUNK_CHARS,
    Tokenizer,
    split_at_lines,
    tokenizer_from_definition,
)
from gptlab.tokens import (
    MASK_VALUES,
    ShardWriter,
    dtype_for_vocab,
    mask_split,
    meta_path,
    tokenizer_path,
)

# Bytes of text one worker encodes per task: large enough that handing results back costs
# little next to encoding, small enough that the tasks in flight hold a few tens of MB.
RANGE_BYTES = 4 << 20


@dataclass(frozen=True)
class EncodeStats:
    tokens: int
    chars: int
    bytes: int
    seconds: float
    shards: int
    workers: int  # processes that encoded (1: this one; small files are not worth more)
    worker_peak_rss_mb: float  # the largest resident size of any encoding process


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
    writer = ShardWriter(out_dir, split, tokenizer.vocab_size, tokenizer.fingerprint, shard_tokens)
    try:
        with writer, tqdm(total=size, unit="B", unit_scale=True, desc=f"encode {text_path.name}",
                          disable=None, file=sys.stderr) as progress:
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


def encode_conversations(tokenizer: Tokenizer, jsonl_path: Path, out_dir: Path, split: str,
                         shard_tokens: int, answers_only: bool = True) -> EncodeStats:
    """Render each conversation of a JSON-lines file with the chat template into token shards,
    and its loss mask into mask shards of the same lengths (see gptlab.tokens). Done in this
    process: conversation sets are small next to pretraining text."""
    start = time.perf_counter()
    chars = size = 0
    ids_writer = ShardWriter(out_dir, split, tokenizer.vocab_size, tokenizer.fingerprint,
                             shard_tokens)
    mask_writer = ShardWriter(out_dir, mask_split(split), MASK_VALUES, tokenizer.fingerprint,
                              shard_tokens)
    with ids_writer, mask_writer:
        for number, messages in enumerate(read_conversations(jsonl_path), start=1):
            try:
                ids, mask = encode_conversation(tokenizer, messages, answers_only)
            except GptlabError as error:
                raise GptlabError(f"{jsonl_path}: conversation {number}: {error}") from None
            ids_writer.write(ids)
            mask_writer.write(mask)
            text = render(messages)
            chars, size = chars + len(text), size + len(text.encode())
    return EncodeStats(ids_writer.count, chars, size, time.perf_counter() - start,
                       ids_writer.shards, 1, peak_rss_mb())


def encode_splits(tokenizer: Tokenizer, texts: dict[str, Path], out_dir: Path,
                  shard_tokens: int, workers: int | None = None,
                  answers_only: bool = True) -> dict[str, EncodeStats]:
    """Write a token folder: tokenizer.json, each split's token shards, and meta.json describing
    them (later stages read the split sizes from it, e.g. bytes for bits per byte). Splits given as
    `.jsonl` files are conversations, written with their loss masks (counting the answers
    only, or every token)."""
    tokenizer.save(tokenizer_path(out_dir))
    masked = all(path.suffix == ".jsonl" for path in texts.values())
    if masked:
        stats = {split: encode_conversations(tokenizer, path, out_dir, split, shard_tokens,
                                             answers_only)
                 for split, path in texts.items()}
    else:
        stats = {split: encode_file(tokenizer, path, out_dir, split, shard_tokens, workers)
                 for split, path in texts.items()}
    write_json(meta_path(out_dir), {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "shard_tokens": shard_tokens,
        **{f"{split}_{field}": getattr(s, field)
           for split, s in stats.items() for field in ("tokens", "chars", "bytes", "shards")},
        # What the masks count is part of the tokens: a run on other masks is another run.
        **({"loss_mask": "answers" if answers_only else "all"} if masked else {}),
    })
    return stats


def tokenize_metrics(tokenizer: Tokenizer, stats: dict[str, EncodeStats]) -> dict[str, Any]:
    """The tokenize stage's metrics: split sizes, compression and encoding speed."""
    tokens = sum(s.tokens for s in stats.values())
    total_bytes = sum(s.bytes for s in stats.values())
    return {
        "train_tokens": stats["train"].tokens,
        "val_tokens": stats["val"].tokens,
        "train_shards": stats["train"].shards,
        "vocab_size": tokenizer.vocab_size,
        "chars_per_token": round(sum(s.chars for s in stats.values()) / max(tokens, 1), 4),
        "bytes_per_token": round(total_bytes / max(tokens, 1), 4),
        "encode_mb_per_sec": round(total_bytes / 1e6 / sum(s.seconds for s in stats.values()), 2),
        "workers": max(s.workers for s in stats.values()),
        "worker_peak_rss_mb": round(max(s.worker_peak_rss_mb for s in stats.values()), 1),
    }


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
    pool = ProcessPoolExecutor(workers, context, _start_worker,
                               (tokenizer.to_json(), str(text_path)))
    try:
        in_flight: collections.deque = collections.deque()
        for task in tasks:
            in_flight.append(_submit(pool, task))
            if len(in_flight) > workers:  # every worker busy, one result waiting: no more
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    except BrokenProcessPool:  # a worker killed (out of memory, say): fail, never wait forever
        # Python 3.11's pool can start a worker while it tears itself down after another died,
        # then wait for that one forever: end them all first (the encoder is gptlab's only
        # user of multiprocessing, so this process's children are the pool's workers).
        for worker in multiprocessing.active_children():
            worker.kill()
        raise GptlabError(f"{text_path}: a tokenizer worker process died (out of memory?); "
                          f"rerun the tokenize stage") from None
    finally:
        pool.shutdown(cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, task: tuple[tuple[int, int], Path]) -> Future:
    try:
        return pool.submit(_encode_range, task)
    except OSError as error:
        # Python 3.11's pool starts a replacement worker on submit; when a worker has just died,
        # the pool's pipes are already closed and that start fails before the pool reports
        # itself broken.
        raise BrokenProcessPool(f"starting a worker failed: {error}") from error


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
