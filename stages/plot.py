"""plot stage: figures of the training run (loss, learning rate, throughput) into plots/."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.params import load_params
from gptlab.plots import make_figures

LOG = Path("plots/train_log.csv")
PLOTS_DIR = Path("plots")


def main() -> None:
    params = load_params()
    for path in make_figures(LOG, PLOTS_DIR, params.plot):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
