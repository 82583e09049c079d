"""clean stage: normalise, deduplicate and split RAW_DIR into CLEAN_DIR/{train,val}.txt."""

from pathlib import Path

from gptlab.clean import clean_corpus
from gptlab.errors import run_main
from gptlab.io import atomic_dir, write_json
from gptlab.params import load_params


def main(raw_dir: Path, clean_dir: Path, metrics_json: Path) -> None:
    params = load_params()
    # The corpus is streamed into the staging folder, which replaces clean_dir only once
    # every file in it is complete.
    with atomic_dir(clean_dir, "the clean text") as staging:
        result = clean_corpus(raw_dir, params.clean, staging)
        write_json(staging / "report.json", result.report)
    write_json(metrics_json, result.metrics, "the clean metrics")
    print(f"{result.metrics['near_clusters']} works found in several editions "
          f"(kept and dropped documents: {clean_dir / 'report.json'})")
    print(", ".join(f"{key}={value}" for key, value in result.metrics.items()))


if __name__ == "__main__":
    run_main(main, "RAW_DIR", "CLEAN_DIR", "METRICS_JSON")
