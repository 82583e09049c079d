"""download stage: fetch the raw corpus named by params `data` into data/raw/."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.io import atomic_dir, write_json
from gptlab.params import load_params
from gptlab.sources import fetch

RAW_DIR = Path("data/raw")
DOWNLOAD_CACHE = Path(".gptlab") / "downloads"


def main() -> None:
    params = load_params()
    with atomic_dir(RAW_DIR) as staging:
        manifest = fetch(params.data, staging, DOWNLOAD_CACHE)
        write_json(staging / "manifest.json", manifest)
    print(f"data/raw: {manifest['file_count']} files, {manifest['total_bytes']:,} bytes "
          f"from {params.data.source} {params.data.spec}")


if __name__ == "__main__":
    run_main(main)
