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
    # The corpus is streamed into the staging folder, which replaces data/clean only once
    # every file in it is complete.
    with atomic_dir(CLEAN_DIR) as staging:
        result = clean_corpus(RAW_DIR, params.clean, staging)
        write_json(staging / "report.json", result.report)
    write_json(METRICS, result.metrics)
    print(f"{result.metrics['near_clusters']} works found in several editions "
          f"(kept and dropped documents: {CLEAN_DIR / 'report.json'})")
    print(", ".join(f"{key}={value}" for key, value in result.metrics.items()))


if __name__ == "__main__":
    run_main(main)
