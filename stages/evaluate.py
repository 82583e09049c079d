"""evaluate stage: score models/ on every token of data/tokens/val_*.bin into metrics/eval.json."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.evaluate import evaluate_model
from gptlab.io import write_json
from gptlab.params import load_params

MODELS_DIR = Path("models")
TOKENS_DIR = Path("data/tokens")
METRICS = Path("metrics/eval.json")


def main() -> None:
    params = load_params()
    metrics = evaluate_model(MODELS_DIR, TOKENS_DIR, params.eval)
    write_json(METRICS, metrics)
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
