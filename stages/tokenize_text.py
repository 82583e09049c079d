"""tokenize stage: turn data/clean/{train,val}.txt into token shards with the chosen tokenizer.

(Not named tokenize.py: that would shadow the standard library module of the same name.)
"""

from pathlib import Path

from gptlab.errors import GptlabError, run_main
from gptlab.io import atomic_dir, write_json
from gptlab.params import load_params
from gptlab.tokenizers import build_tokenizer
from gptlab.tokens import encode_splits

CLEAN_DIR = Path("data/clean")
TOKENS_DIR = Path("data/tokens")
METRICS = Path("metrics/tokenize.json")
SPLITS = ("train", "val")


def main() -> None:
    params = load_params()
    texts = {split: CLEAN_DIR / f"{split}.txt" for split in SPLITS}
    for path in texts.values():
        if not path.is_file():
            raise GptlabError(f"{path}: not found (run the clean stage first)")
    tokenizer = build_tokenizer(params.tokenizer, texts["train"], texts["val"])
    with atomic_dir(TOKENS_DIR) as staging:
        stats = encode_splits(tokenizer, texts, staging, params.tokenizer.shard_tokens)
    tokens = sum(s.tokens for s in stats.values())
    total_bytes = sum(s.bytes for s in stats.values())
    metrics = {
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
    write_json(METRICS, metrics)
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
