"""The README's figures are the committed ones: its first table, the pipeline page's figures of
the default corpus, the scaling fit and the speedrun's records are checked against the metrics
files, so they cannot drift apart."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import ROOT

from gptlab.lab.speedrun import render_records

README = (ROOT / "README.md").read_text()
PIPELINE_PAGE = (ROOT / "docs" / "pipeline.md").read_text()


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the table of `text` that starts with `header`, as cells."""
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def first_table() -> list[list[str]]:
    """The rows of the README's first table (the figures of a run)."""
    return table_rows(README, "| figure | value | from |")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def committed(file: str) -> dict:
    """A metrics file as committed: `make repro` rewrites the workspace's copy with this
    machine's speed (and, on a CPU whose bf16 kernels round differently, its losses)."""
    shown = subprocess.run(["git", "show", f"HEAD:{file}"], cwd=ROOT, capture_output=True,
                           text=True)
    return json.loads(shown.stdout if shown.returncode == 0 else (ROOT / file).read_text())


@pytest.mark.parametrize("row", first_table(), ids=lambda row: row[0])
def test_each_figure_of_the_first_table_is_the_committed_metric(row):
    _, value, source = row
    file, key = re.fullmatch(r"`(metrics/\w+\.json)` `(\w+)`", source).groups()
    assert_shows(value, committed(file)[key], key)


def assert_shows(value: str, metric: float, key: str) -> None:
    """`value` is `metric` rounded as shown, or a range (`10-20`) that holds it."""
    if found := re.match(r"([\d,]+)-([\d,]+)", value):
        low, high = map(number, found.groups())
        assert low <= metric <= high, f"{key}: {metric} is outside {value}"
    else:
        shown = re.match(r"[\d,.]+", value).group()
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        # Rounded as shown (a metric exactly half way may round either way).
        assert abs(number(shown) - metric) <= 0.5 * 10**-decimals + 1e-9, f"{key}: {metric}"


def corpus_figures() -> list[tuple[str, str, str]]:
    """The pipeline page's figures of the default corpus as (metrics file, key, value): each row
    holds a clean.json figure, then a tokenize.json one; `a / b` shows two keys in one cell."""
    figures = []
    for cells in table_rows(PIPELINE_PAGE, "| `metrics/clean.json` | value |"):
        for file, keys, values in (("metrics/clean.json", *cells[0:2]),
                                   ("metrics/tokenize.json", *cells[3:5])):
            if keys:
                figures += [(file, key, value)
                            for key, value in zip(keys.split(" / "), values.split(" / "),
                                                  strict=True)]
    return figures


@pytest.mark.parametrize(("file", "key", "value"), corpus_figures(),
                         ids=lambda part: part if "/" not in part else None)
def test_each_figure_of_the_default_corpus_is_the_committed_metric(file, key, value):
    assert_shows(value, committed(file)[key], key)


def test_the_first_table_covers_the_headline_metrics():
    keys = {row[2].split("`")[3] for row in first_table()}
    assert {"val_loss", "perplexity", "bits_per_byte", "tokens_per_sec"} <= keys


@pytest.mark.parametrize("page", ["README.md", *sorted(
    path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md"))])
def test_every_relative_link_of_the_docs_points_to_a_file_of_the_repository(page):
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t)]
    missing = [t for t in relative if not ((ROOT / page).parent / t).exists()]
    assert missing == []


def test_the_scaling_table_shows_the_committed_fit_with_its_intervals():
    gptlab_row = table_rows(README, "| fit | a (N_opt ∝ C^a) |")[0]
    assert gptlab_row[0].startswith("gptlab, default corpus")
    law = committed("metrics/scaling.json")["law"]
    for cell, name in zip(gptlab_row[1:], ("a", "b", "alpha", "beta"), strict=True):
        estimate = law[name]
        shown = [estimate["value"], estimate["ci95"]["low"], estimate["ci95"]["high"]]
        assert cell == "{:.2f} [{:.2f}, {:.2f}]".format(*shown), name


@pytest.mark.parametrize("page", ["README.md", "docs/speedrun.md"])
def test_the_speedrun_records_are_the_committed_study(page):
    """`gptlab speedrun` wrote the tables from the study's experiments, and the numbers it read
    into metrics/speedrun.json: the page shows exactly what that file holds."""
    study = committed("metrics/speedrun.json")
    assert render_records(study) in (ROOT / page).read_text()
    rows = {row["recipe"]: row for row in study["recipes"]}
    assert rows["record"]["reaches_target"] and rows["record"]["n"] >= 5
