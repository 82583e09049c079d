"""Ctrl-C and SIGTERM as a request to stop: the training loop finishes its step, saves a
checkpoint and returns, rather than dying with half-accumulated gradients; the command then
exits as Ctrl-C ends any gptlab command."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


@dataclass
class StopRequest:
    requested: bool = False


@contextlib.contextmanager
def sigint_as_stop_request() -> Iterator[StopRequest]:
    """Turn Ctrl-C (or SIGTERM, as torchrun and batch schedulers send) into a request the loop
    honours after the current step (under DDP, at the next log interval), with a checkpoint.

    Stopping mid-step would save half-accumulated gradients; a second Ctrl-C stops at once.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread may handle signals
        return

    def on_sigint(signum: int, frame: Any) -> None:
        # Only a second Ctrl-C aborts: a scheduler's SIGTERM often arrives twice (once to the
        # job, once forwarded by torchrun), and must still end with a checkpoint.
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)",
                   file=sys.stderr)

    previous = {signum: signal.signal(signum, on_sigint)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
