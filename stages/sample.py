"""sample stage: continue each prompt of params.sample with the model in models/, into samples/."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.generate import sample_prompts
from gptlab.io import write_json, write_text
from gptlab.params import load_params

MODELS_DIR = Path("models")
SAMPLES = Path("samples/samples.md")
METRICS = Path("metrics/sample.json")


def main() -> None:
    params = load_params()
    markdown, metrics = sample_prompts(MODELS_DIR, params.sample)
    write_text(SAMPLES, markdown)
    write_json(METRICS, metrics)
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
