"""Token files: a small fixed header, then token ids, read back through numpy.memmap.

Layout (little-endian, 64-byte header):
    magic "GPTLABTK" | format version u32 | bytes per token u32 (2 or 4) | token count u64 |
    vocabulary size u64 | tokenizer fingerprint (8 bytes) | zero padding
The header lets a reader refuse a truncated file, a foreign file, or tokens written by another
tokenizer, instead of training on garbage.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, write_json
from gptlab.tokenizers import Tokenizer, iter_text_chunks

MAGIC = b"GPTLABTK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ8s")
# Text chunks handed to the tokenizer at once (4 MiB): enough for every core to have many.
ENCODE_BATCH_CHUNKS = 64


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


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond: half the disk and memory for most tokenizers."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_file(tokenizer: Tokenizer, text_path: Path, out_path: Path) -> EncodeStats:
    """Stream `text_path` through the tokenizer into a token file, in batches of chunks."""
    size = text_path.stat().st_size
    start = time.perf_counter()
    chars = 0
    with TokenWriter(out_path, tokenizer.vocab_size, tokenizer.fingerprint) as writer, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"encode {text_path.name}", disable=None,
        file=sys.stderr,
    ) as progress:
        for batch in _batches(iter_text_chunks(text_path), ENCODE_BATCH_CHUNKS):
            for ids in tokenizer.encode_batch(batch):
                writer.write(ids)
            chars += sum(len(chunk) for chunk in batch)
            progress.update(sum(len(chunk.encode()) for chunk in batch))
    return EncodeStats(writer.count, chars, size, time.perf_counter() - start)


def encode_splits(tokenizer: Tokenizer, texts: dict[str, Path], out_dir: Path
                  ) -> dict[str, EncodeStats]:
    """Write a token folder: tokenizer.json, a token file per split, and meta.json describing
    them (later stages read the split sizes from it, e.g. bytes for bits per byte)."""
    tokenizer.save(out_dir / "tokenizer.json")
    stats = {split: encode_file(tokenizer, path, out_dir / f"{split}.bin")
             for split, path in texts.items()}
    write_json(out_dir / "meta.json", {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        **{f"{split}_{field}": getattr(s, field)
           for split, s in stats.items() for field in ("tokens", "chars", "bytes")},
    })
    return stats


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


def _batches(chunks: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
