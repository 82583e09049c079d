"""A corpus too large for one range, encoded by one worker process per core: the throughput
and each worker's peak memory, printed as a line of `make bench`.

    python -m gptlab.bench.parallel_tokenize {char,TIKTOKEN_ENCODING} TEXT_FILE OUT_DIR

A process of its own, started by gptlab.bench: spawned workers import the main module, and the
bench's (which imports torch) would slow their start as the tokenize stage's never does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptlab.encode import encode_file
from gptlab.tokenizers import CharTokenizer, TiktokenTokenizer, Tokenizer


def tokenizer_of(name: str, text_path: Path) -> Tokenizer:
    """`char`: the characters of the text; else the tiktoken encoding `name`."""
    if name == "char":
        return CharTokenizer(text_path.read_text(encoding="utf-8"))
    return TiktokenTokenizer(name)


def main() -> None:
    name, text_path, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    tokenizer = tokenizer_of(name, text_path)
    stats = encode_file(tokenizer, text_path, out_dir, "big", 10**9)
    print(f"  {tokenizer.kind:9s} {stats.bytes / 1e6:.0f} MB, {stats.workers} workers: "
          f"{stats.bytes / 1e6 / stats.seconds:7.2f} MB/s, peak {stats.worker_peak_rss_mb:.0f} MB "
          f"per worker")


if __name__ == "__main__":
    main()
