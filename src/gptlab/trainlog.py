"""The training log, plots/train_log.csv: one row per logged step, written by the train stage
and read by the plot stage (and by `dvc plots`).

A row holds what was measured at its step: the train loss, learning rate, gradient norm and
speed at a log step, the val loss at an evaluation step, or both; a cell with nothing measured
stays empty. No torch here: reading the log must not cost the plot stage a deep-learning import.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.io import write_text

LOG_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec")
# Counted, not measured: always present, and whole numbers.
COUNT_COLUMNS = ("step", "tokens")

LogRow = dict[str, Any]


def write_log(rows: list[LogRow], path: str | os.PathLike) -> None:
    """The log as CSV, atomically; columns a row does not have stay empty."""
    lines = [",".join(LOG_COLUMNS)]
    for row in rows:
        lines.append(",".join(_cell(row.get(column)) for column in LOG_COLUMNS))
    write_text(path, "\n".join(lines) + "\n", "the training log")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_log(path: str | os.PathLike) -> list[LogRow]:
    """The log's rows, every cell a number: an int in the count columns, else a float (NaN
    where the cell is empty)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            rows = list(reader)
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (run the train stage first)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise GptlabError(f"{path}: not a training log ({error})") from None
    if not columns:
        raise GptlabError(f"{path}: not a training log (the file is empty)")
    missing = [column for column in LOG_COLUMNS if column not in columns]
    if missing:
        raise GptlabError(f"{path}: missing columns {missing}")
    if not rows:
        raise GptlabError(f"{path}: no rows")
    return [_numbers(row, path, line) for line, row in enumerate(rows, start=2)]


def _numbers(row: dict[str, str | None], path: Path, line: int) -> LogRow:
    parsed: LogRow = {}
    for column in LOG_COLUMNS:
        cell = (row.get(column) or "").strip()
        try:
            if column in COUNT_COLUMNS:
                parsed[column] = int(cell)
            else:
                parsed[column] = float(cell) if cell else math.nan
        except ValueError:
            raise GptlabError(f"{path}: line {line}: non-numeric {column} {cell!r}") from None
    return parsed
