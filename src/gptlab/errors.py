"""One kind of user-facing error, and the guard every entry point runs under.

A stage that fails on bad input prints a single line naming the file or parameter and what is
wrong, exits non-zero, and shows a traceback only when GPTLAB_DEBUG=1 asks for one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class GptlabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def run_main(main: Callable[..., None], *path_args: str) -> None:
    """Run an entry point, turning known failures into one line on stderr and exit code 1.

    A stage names its paths (`path_args`, e.g. "RAW_DIR"): the command line, as dvc.yaml writes
    it, gives them in that order, and `main` receives them as Paths.
    """
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name)
    for name in path_args:
        parser.add_argument(name, type=Path)
    paths = vars(parser.parse_args()) if path_args else {}
    try:
        main(*paths.values())
    except GptlabError as error:
        if os.environ.get("GPTLAB_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        exit_stopped()


def exit_stopped() -> NoReturn:
    """End a command whose run Ctrl-C or a stop request ended: status 130 (128 + SIGINT) tells
    the shell, DVC or a scheduler that the run did not finish, and its checkpoint, if it saved
    one, lets the next one resume."""
    print("interrupted", file=sys.stderr)
    sys.exit(130)
