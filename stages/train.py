"""train stage: train the model on TOKENS_DIR into MODELS_DIR, with a per-step log and metrics.

With train.nproc > 1 the stage starts itself again under torchrun, one process per GPU (or
CPU worker); started by torchrun (as on several machines), it is one process of that run.
"""

import sys
from pathlib import Path

from gptlab.device import pick_device
from gptlab.distributed import relaunch_under_torchrun, under_torchrun, world_from_env
from gptlab.errors import exit_stopped, run_main
from gptlab.io import cache_dir, write_json
from gptlab.params import RunParams, load_params
from gptlab.train import TrainPaths, train


def main(tokens_dir: Path, models_dir: Path, log_csv: Path, metrics_json: Path) -> None:
    params = load_params()
    if params.train.nproc > 1 and not under_torchrun():
        device = pick_device(params.train.device, "train.device")
        sys.exit(relaunch_under_torchrun(params.train.nproc, device, sys.argv))
    paths = TrainPaths(tokens_dir, models_dir, log_csv, cache_dir("runs"))
    metrics = train(RunParams(params.seed, params.model, params.train), paths)
    if metrics is None:  # stopped by Ctrl-C or SIGTERM, after a checkpoint
        exit_stopped()
    if world_from_env().is_main:
        write_json(metrics_json, metrics, "the training metrics")
        print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main, "TOKENS_DIR", "MODELS_DIR", "LOG_CSV", "METRICS_JSON")
