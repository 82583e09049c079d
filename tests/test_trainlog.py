"""The training log's format: what train writes, plots reads back, and bad logs are named."""

from __future__ import annotations

import math

import pytest

from gptlab.errors import GptlabError
from gptlab.trainlog import LOG_COLUMNS, read_log, write_log

ROWS = [
    {"step": 0, "tokens": 0, "val_loss": 4.25},
    {"step": 10, "tokens": 640, "train_loss": 3.5, "lr": 1e-3, "grad_norm": 1.25,
     "tokens_per_sec": 41234.5678},
    {"step": 20, "tokens": 1280, "train_loss": 3.0, "val_loss": 3.125, "lr": 5e-4,
     "grad_norm": 0.5, "tokens_per_sec": 40000.0},
]


def test_rows_round_trip_with_empty_cells_as_nan(tmp_path):
    log = tmp_path / "plots" / "train_log.csv"
    write_log(ROWS, log)
    lines = log.read_text().splitlines()
    assert lines[0] == ",".join(LOG_COLUMNS)
    assert lines[1] == "0,0,,4.25,,,"  # what was not measured at a step stays empty
    assert lines[2].endswith(",41234.6")  # six significant digits: a readable diff
    rows = read_log(log)
    assert [row["step"] for row in rows] == [0, 10, 20]
    assert all(isinstance(row["step"], int) and isinstance(row["tokens"], int) for row in rows)
    assert math.isnan(rows[0]["train_loss"]) and rows[2]["val_loss"] == 3.125
    assert [p.name for p in log.parent.iterdir()] == ["train_log.csv"]  # no temporary file


@pytest.mark.parametrize(("content", "problem"), [
    (None, "not found"),
    ("", "not a training log"),
    ("step,tokens,train_loss\n1,2,3\n", "missing columns"),
    (",".join(LOG_COLUMNS) + "\n", "no rows"),
    (",".join(LOG_COLUMNS) + "\n1,768,abc,,,,\n", "line 2: non-numeric train_loss 'abc'"),
    (",".join(LOG_COLUMNS) + "\n1.5,768,,,,,\n", "line 2: non-numeric step '1.5'"),
    (b"step\xff\n", "not a training log"),
])
def test_a_bad_log_is_named_with_its_problem(tmp_path, content, problem):
    log = tmp_path / "train_log.csv"
    if isinstance(content, bytes):
        log.write_bytes(content)
    elif content is not None:
        log.write_text(content)
    with pytest.raises(GptlabError, match=f"{log}: {problem}"):
        read_log(log)
