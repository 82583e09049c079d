"""tokenize stage: turn CLEAN_DIR/{train,val}.txt into token shards in TOKENS_DIR with the
chosen tokenizer; conversations, CLEAN_DIR/{train,val}.jsonl, are rendered with the chat
template into token shards and loss masks, by the tokenizer with the chat tokens added.

(Not named tokenize.py: that would shadow the standard library module of the same name.)
"""

from pathlib import Path

from gptlab.chat import message_contents
from gptlab.encode import encode_splits, tokenize_metrics
from gptlab.errors import GptlabError, run_main
from gptlab.io import atomic_dir, write_json
from gptlab.params import load_params
from gptlab.tokenizers import ChatTokenizer, build_tokenizer


def main(clean_dir: Path, tokens_dir: Path, metrics_json: Path) -> None:
    params = load_params()
    suffix = ".jsonl" if (clean_dir / "train.jsonl").is_file() else ".txt"
    texts = {split: clean_dir / f"{split}{suffix}" for split in ("train", "val")}
    for path in texts.values():
        if not path.is_file():
            raise GptlabError(f"{path}: not found (run the clean stage first)")
    if suffix == ".jsonl":
        tokenizer = ChatTokenizer(build_tokenizer(params.tokenizer, texts["train"],
                                                  texts["val"], message_contents))
    else:
        tokenizer = build_tokenizer(params.tokenizer, texts["train"], texts["val"])
    with atomic_dir(tokens_dir, "token shards") as staging:
        stats = encode_splits(tokenizer, texts, staging, params.tokenizer.shard_tokens,
                              answers_only=params.tokenizer.chat_loss == "answers")
    metrics = tokenize_metrics(tokenizer, stats)
    write_json(metrics_json, metrics, "the tokenize metrics")
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main, "CLEAN_DIR", "TOKENS_DIR", "METRICS_JSON")
