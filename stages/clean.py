"""clean stage: normalise, deduplicate and split data/raw/ into data/clean/{train,val}.txt."""

from pathlib import Path

from gptlab.clean import clean_corpus
from gptlab.errors import run_main
from gptlab.io import atomic_dir, write_json
from gptlab.params import load_params

RAW_DIR = Path("data/raw")
CLEAN_DIR = Path("data/clean")
METRICS = Path("metrics/clean.json")


def main() -> None:
    params = load_params()
    result = clean_corpus(RAW_DIR, params.clean)
    with atomic_dir(CLEAN_DIR) as staging:
        (staging / "train.txt").write_text(result.train_text, encoding="utf-8")
        (staging / "val.txt").write_text(result.val_text, encoding="utf-8")
        write_json(staging / "report.json", result.report)
    write_json(METRICS, result.metrics)
    print(f"{len(result.report['near_duplicates'])} works found in several editions "
          f"(kept and dropped documents: {CLEAN_DIR / 'report.json'})")
    print(", ".join(f"{key}={value}" for key, value in result.metrics.items()))


if __name__ == "__main__":
    run_main(main)
