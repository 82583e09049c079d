"""train stage: train the model on data/tokens/ into models/, with a per-step log and metrics.

With train.nproc > 1 the stage starts itself again under torchrun, one process per GPU (or
CPU worker); started by torchrun (as on several machines), it is one process of that run.
"""

import sys
from pathlib import Path

from gptlab.distributed import relaunch_under_torchrun, under_torchrun, world_from_env
from gptlab.errors import run_main
from gptlab.io import write_json
from gptlab.params import load_params
from gptlab.train import RunParams, train

METRICS = Path("metrics/train.json")


def main() -> None:
    params = load_params()
    if params.train.nproc > 1 and not under_torchrun():
        sys.exit(relaunch_under_torchrun(params.train.nproc, __file__))
    metrics = train(RunParams(params.seed, params.model, params.train))
    if world_from_env().is_main:
        write_json(METRICS, metrics)
        print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
