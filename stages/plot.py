"""plot stage: figures of the training run (loss, learning rate, throughput) into PLOTS_DIR."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.params import load_params
from gptlab.plots import make_figures


def main(log_csv: Path, plots_dir: Path) -> None:
    params = load_params()
    for path in make_figures(log_csv, plots_dir, params.plot):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main, "LOG_CSV", "PLOTS_DIR")
