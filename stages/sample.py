"""sample stage: continue each prompt of params.sample with the model in MODELS_DIR."""

import sys
from pathlib import Path

from gptlab.errors import run_main
from gptlab.generate import sample_prompts
from gptlab.io import write_json, write_text
from gptlab.params import load_params


def main(models_dir: Path, samples_md: Path, metrics_json: Path) -> None:
    params = load_params()
    markdown, metrics = sample_prompts(models_dir, params.sample)
    write_text(samples_md, markdown, "the samples")
    write_json(metrics_json, metrics, "the sampling metrics")
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))
    if metrics["skipped_prompts"]:
        print(f"note: {metrics['skipped_prompts']} prompt(s) skipped, which the model's "
              f"vocabulary cannot encode: see {samples_md}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "MODELS_DIR", "SAMPLES_MD", "METRICS_JSON")
