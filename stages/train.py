"""train stage: train the model on data/tokens/ into models/, with a per-step log and metrics."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.io import write_json
from gptlab.params import load_params
from gptlab.train import RunParams, train

METRICS = Path("metrics/train.json")


def main() -> None:
    params = load_params()
    metrics = train(RunParams(params.seed, params.model, params.train))
    write_json(METRICS, metrics)
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
