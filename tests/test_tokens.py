"""Tests of gptlab.tokens: the token file format (header, writer, reader, refusals) and the
token folder's meta.json, read without a tokenizer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import VERSE as SHARED_VERSE

from gptlab.encode import encode_splits
from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer
from gptlab.tokens import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    TokenWriter,
    dtype_for_vocab,
    open_split,
    open_tokens,
    read_header,
    read_meta,
)

FINGERPRINT = "0123456789abcdef"
VERSE = SHARED_VERSE + "Résolved. resolved — «toujours»!\n"  # and some non-ASCII


def write_tokens(path: Path, ids, vocab_size: int, fingerprint: str = FINGERPRINT) -> Path:
    with TokenWriter(path, vocab_size, fingerprint) as writer:
        writer.write(np.asarray(ids, dtype=np.int64))
    return path


def token_error(path: Path, fingerprint: str | None = None) -> str:
    """The message open_tokens refuses `path` with; it must always name the file."""
    with pytest.raises(GptlabError) as caught:
        open_tokens(path, fingerprint)
    message = str(caught.value)
    assert str(path) in message
    return message


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# writing and reading


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(65, np.uint16), (50_257, np.uint16), (65_536, np.uint16), (65_537, np.uint32),
     (100_277, np.uint32)],
)
def test_write_then_open(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    # The largest and smallest ids must survive: a uint16 file for 65,536 ids holds 65,535.
    ids = np.array([0, 1, vocab_size // 2, vocab_size - 1, 7, 0], dtype=np.int64)
    path = write_tokens(tmp_path / "train.bin", ids, vocab_size)
    tokens = open_tokens(path)
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == dtype
    assert dtype_for_vocab(vocab_size) == dtype
    assert tokens.tolist() == ids.tolist()
    # The file is exactly header + ids: nothing else on disk.
    assert path.stat().st_size == HEADER_BYTES + len(ids) * np.dtype(dtype).itemsize


def test_header_fields(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", np.arange(100) % 65, 65)
    header = read_header(path)
    assert header.version == FORMAT_VERSION
    assert header.itemsize == 2
    assert header.count == 100
    assert header.vocab_size == 65
    assert header.tokenizer_fingerprint == FINGERPRINT
    assert header.dtype == np.uint16
    raw = path.read_bytes()[:HEADER_BYTES]
    assert raw.startswith(MAGIC)
    # The documented layout, little-endian, zero-padded to the header size.
    assert struct.unpack_from("<8sIIQQ8s", raw) == (
        MAGIC, FORMAT_VERSION, 2, 100, 65, bytes.fromhex(FINGERPRINT)
    )
    assert raw[40:] == bytes(HEADER_BYTES - 40)


def test_several_writes_append(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    with TokenWriter(path, 1000, FINGERPRINT) as writer:
        writer.write(np.arange(10))
        writer.write(np.array([], dtype=np.int64))
        writer.write(np.arange(990, 1000))
        assert writer.count == 20
    assert open_tokens(path).tolist() == [*range(10), *range(990, 1000)]
    assert read_header(path).count == 20


def test_an_empty_token_file(tmp_path: Path) -> None:
    path = tmp_path / "val.bin"
    with TokenWriter(path, 65, FINGERPRINT):
        pass
    assert read_header(path).count == 0
    tokens = open_tokens(path)
    assert len(tokens) == 0
    assert tokens.dtype == np.uint16


def test_open_tokens_is_read_only(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", [1, 2, 3], 65)
    tokens = open_tokens(path)
    with pytest.raises(ValueError):
        tokens[0] = 5
    assert open_tokens(path).tolist() == [1, 2, 3]


def test_open_tokens_accepts_the_tokenizer_that_wrote_them(tmp_path: Path) -> None:
    tok = CharTokenizer(VERSE)
    path = write_tokens(tmp_path / "train.bin", tok.encode(VERSE), tok.vocab_size,
                        tok.fingerprint)
    assert tok.decode(open_tokens(path, tok.fingerprint)) == VERSE


# ---------------------------------------------------------------------------------------------
# refusals


def test_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", np.arange(100), 65_537)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # part of the last token cut off, as by a full disk
    assert "truncated" in token_error(path)
    path.write_bytes(data[:HEADER_BYTES])  # the header alone
    assert "truncated" in token_error(path)


def test_refuses_a_file_longer_than_its_header_says(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", np.arange(100) % 65, 65)
    with open(path, "ab") as f:
        f.write(b"\x00\x01")
    assert "longer" in token_error(path)


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(0).bytes(1000),  # random bytes, such as a stray download
        b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3,
        b"",
        MAGIC,  # the magic alone: a header cut short
        np.arange(100, dtype=np.uint16).tobytes(),  # a nanoGPT train.bin: ids with no header
    ],
)
def test_refuses_a_foreign_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "train.bin"
    path.write_bytes(content)
    assert "not a gptlab token file" in token_error(path)


def test_refuses_another_format_version(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", [1, 2, 3], 65)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    message = token_error(path)
    assert f"version {FORMAT_VERSION + 1}" in message


def test_refuses_a_damaged_item_size(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", [1, 2, 3], 65)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 12, 3)
    path.write_bytes(bytes(data))
    assert "damaged header" in token_error(path)


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    assert "not found" in token_error(tmp_path / "train.bin")
    with pytest.raises(GptlabError, match="not found"):
        read_header(tmp_path / "train.bin")


def test_refuses_tokens_from_another_tokenizer(tmp_path: Path) -> None:
    tok = CharTokenizer(VERSE)
    path = write_tokens(tmp_path / "train.bin", tok.encode(VERSE), tok.vocab_size,
                        tok.fingerprint)
    # Same size of vocabulary, different characters: only the fingerprint tells them apart.
    other = CharTokenizer("".join(chr(ord("A") + i) for i in range(tok.vocab_size)))
    assert other.vocab_size == tok.vocab_size
    assert "another tokenizer" in token_error(path, other.fingerprint)


@pytest.mark.parametrize("bad_id", [65, 66, 1 << 16, 1 << 40])
def test_refuses_to_write_an_id_outside_the_vocabulary(tmp_path: Path, bad_id: int) -> None:
    path = tmp_path / "train.bin"
    with pytest.raises(GptlabError) as caught, TokenWriter(path, 65, FINGERPRINT) as writer:
        writer.write(np.array([1, 2, bad_id, 3]))
    assert str(path) in str(caught.value)
    assert str(bad_id) in str(caught.value)
    assert folder_names(tmp_path) == []


def test_refuses_to_write_a_negative_id(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    with pytest.raises(GptlabError) as caught, TokenWriter(path, 65, FINGERPRINT) as writer:
        writer.write(np.array([1, -1, 3]))
    assert str(path) in str(caught.value)
    assert folder_names(tmp_path) == []


def test_the_negative_id_is_the_one_named(tmp_path: Path) -> None:
    with pytest.raises(GptlabError) as caught, TokenWriter(tmp_path / "t.bin", 65,
                                                           FINGERPRINT) as writer:
        writer.write(np.array([1, -1, 3]))
    assert "-1" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# atomicity


def test_an_exception_inside_the_writer_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    with pytest.raises(RuntimeError, match="killed"), TokenWriter(path, 65, FINGERPRINT) as w:
        w.write(np.arange(50))
        raise RuntimeError("killed half way")
    assert not path.exists()
    # No temporary file beside it either.
    assert folder_names(tmp_path) == []


def test_a_failed_rewrite_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "train.bin", [1, 2, 3], 65)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), TokenWriter(path, 65, FINGERPRINT) as writer:
        writer.write(np.arange(60))
        raise RuntimeError("killed half way")
    assert path.read_bytes() == before
    assert folder_names(tmp_path) == ["train.bin"]


def test_the_file_appears_only_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    with TokenWriter(path, 65, FINGERPRINT) as writer:
        writer.write(np.arange(10))
        assert not path.exists()
    assert path.exists()
    assert folder_names(tmp_path) == ["train.bin"]
    # With the usual permissions, not mkstemp's owner-only ones.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# a token folder: meta.json and each split's shards


def test_open_split_checks_the_shards_against_meta(tmp_path):
    tok = CharTokenizer(VERSE)
    (tmp_path / "train.txt").write_text(VERSE, encoding="utf-8")
    (tmp_path / "val.txt").write_text(VERSE[:100], encoding="utf-8")
    encode_splits(tok, {"train": tmp_path / "train.txt", "val": tmp_path / "val.txt"}, tmp_path,
                  shard_tokens=300)
    meta = read_meta(tmp_path, ["train_tokens", "train_shards"])
    assert meta["train_shards"] == -(-len(VERSE) // 300) and meta["val_shards"] == 1
    assert meta["shard_tokens"] == 300
    shards = open_split(tmp_path, "train", meta)
    assert tok.decode(np.concatenate(shards)) == VERSE
    meta["train_tokens"] -= 1
    with pytest.raises(GptlabError, match=r"train_\*\.bin: the shards hold .*meta\.json says"):
        open_split(tmp_path, "train", meta)
    (tmp_path / "train_000001.bin").unlink()
    with pytest.raises(GptlabError, match=r"train_000001\.bin: not found"):
        open_split(tmp_path, "train", read_meta(tmp_path, []))




@pytest.mark.parametrize("missing", ["vocab_size", "tokenizer_fingerprint", "train_tokens"])
def test_meta_must_name_its_tokenizer_and_the_counts_asked_for(tmp_path, missing):
    meta = {"kind": "char", "vocab_size": 65, "tokenizer_fingerprint": FINGERPRINT,
            "train_tokens": 100}
    del meta[missing]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GptlabError, match=rf"meta\.json: missing or not a positive count: "
                                          rf"{missing} \(rerun the tokenize stage\)"):
        read_meta(tmp_path, ["train_tokens"])
