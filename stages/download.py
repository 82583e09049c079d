"""download stage: fetch the raw corpus named by params `data` into RAW_DIR."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.io import atomic_dir, cache_dir, write_json
from gptlab.params import load_params
from gptlab.sources import fetch


def main(raw_dir: Path) -> None:
    params = load_params()
    with atomic_dir(raw_dir, "the downloaded corpus") as staging:
        manifest = fetch(params.data, staging, cache_dir("downloads"))
        write_json(staging / "manifest.json", manifest)
    print(f"{raw_dir}: {manifest['file_count']} files, {manifest['total_bytes']:,} bytes "
          f"from {params.data.source} {params.data.spec}")


if __name__ == "__main__":
    run_main(main, "RAW_DIR")
