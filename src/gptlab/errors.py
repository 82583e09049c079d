"""One kind of user-facing error, and the guard every entry point runs under.

A stage that fails on bad input prints a single line naming the file or parameter and what is
wrong, exits non-zero, and shows a traceback only when GPTLAB_DEBUG=1 asks for one. Under the
same guard, an entry point writes no output once an input it read (params.yaml) has changed
since it read it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class GptlabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


# The inputs the running entry point read, each with the digest of the text it read; None
# outside run_main, where nothing is watched (a test or a notebook calling the library).
_inputs_read: dict[Path, str] | None = None


def note_input(path: str | os.PathLike, text: str) -> None:
    """Remember what an entry point read from `path`, so that its outputs are refused if the
    file no longer reads the same when they are written."""
    if _inputs_read is None:
        return
    path, digest = Path(path).resolve(), _digest(text)
    # Read twice with different texts: whichever one the outputs come from, the file no longer
    # holds the other, so no digest can match it again.
    _inputs_read[path] = digest if _inputs_read.get(path, digest) == digest else ""


def refuse_if_inputs_changed() -> None:
    """Raise GptlabError, naming the input, when one the entry point read has changed since:
    called before each output is renamed into place.

    DVC, while it records a queued or --temp experiment, writes the experiment's -S values
    into the workspace's params.yaml for a moment: a stage that read them then would publish
    the experiment's result as the workspace's.
    """
    for path, digest in (_inputs_read or {}).items():
        try:
            unchanged = _digest(path.read_text(encoding="utf-8")) == digest
        except (OSError, UnicodeDecodeError):
            unchanged = False
        if not unchanged:
            raise GptlabError(
                f"{path.name}: changed while this ran (as it does for a moment when `dvc exp "
                f"run --queue` or `--temp` records an experiment), so nothing more is written; "
                "run it again")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_main(main: Callable[..., None], *path_args: str) -> None:
    """Run an entry point, turning known failures into one line on stderr and exit code 1.

    A stage names its paths (`path_args`, e.g. "RAW_DIR"): the command line, as dvc.yaml writes
    it, gives them in that order, and `main` receives them as Paths.
    """
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name)
    for name in path_args:
        parser.add_argument(name, type=Path)
    paths = vars(parser.parse_args()) if path_args else {}
    global _inputs_read
    _inputs_read = {}
    try:
        main(*paths.values())
    except GptlabError as error:
        if os.environ.get("GPTLAB_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        exit_stopped()
    finally:
        _inputs_read = None


def exit_stopped() -> NoReturn:
    """End a command whose run Ctrl-C or a stop request ended: status 130 (128 + SIGINT) tells
    the shell, DVC or a scheduler that the run did not finish, and its checkpoint, if it saved
    one, lets the next one resume."""
    print("interrupted", file=sys.stderr)
    sys.exit(130)
