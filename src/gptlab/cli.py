"""The `gptlab` command: small tools around the pipeline (the stages themselves run from DVC)."""

from __future__ import annotations

import argparse
import json

from gptlab import __version__
from gptlab.errors import run_main
from gptlab.params import PARAMS_FILE, load_params
from gptlab.tokens import read_header


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("params", help="validate params.yaml and print it as resolved")
    check.add_argument("file", nargs="?", default=PARAMS_FILE)
    tokens = commands.add_parser("tokens", help="describe a token file from its header")
    tokens.add_argument("file")
    args = parser.parse_args(argv)
    run_main(lambda: COMMANDS[args.command](args))


def show_params(args: argparse.Namespace) -> None:
    print(json.dumps(load_params(args.file).model_dump(), indent=2))


def show_tokens(args: argparse.Namespace) -> None:
    header = read_header(args.file)
    print(json.dumps({"file": args.file, "tokens": header.count, "dtype": header.dtype.name,
                      "vocab_size": header.vocab_size,
                      "tokenizer_fingerprint": header.tokenizer_fingerprint,
                      "format_version": header.version}, indent=2))


COMMANDS = {"params": show_params, "tokens": show_tokens}
