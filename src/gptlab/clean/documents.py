"""The raw folder's documents, read in the download manifest's order or by name, and the
`Facts` pass 1 keeps of each: a file is one document, a JSON-lines file one per line (text or
a conversation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from gptlab.chat import conversation_line, conversation_of
from gptlab.errors import GptlabError

JSONL_SUFFIX = ".jsonl"


@dataclass
class Document:
    name: str
    text: str  # a conversation's: its JSON line (gptlab.chat.conversation_line)
    conversation: bool = False


@dataclass(slots=True, eq=False)
class Facts:
    """What pass 1 keeps of a cleaned document: enough to deduplicate and split it, not its text.

    Compared by identity (the shingles are an array): each document has one Facts object.
    """

    name: str
    chars: int  # length after cleaning
    ends_with_newline: bool  # if not, the joined text adds one
    conversation: bool
    key: bytes = b""  # hash of the text up to white space (dedupe exact and near)
    shingles: np.ndarray | None = None  # hashes of its word 3-grams (dedupe near)
    split: str = ""  # where pass 2 writes it: "train", "val", or "" (dropped)


def read_documents(raw_dir: Path, by_name: bool = False) -> Iterator[Document]:
    """Every document of the download manifest's files, in the manifest's order or by name.

    A `.jsonl` file holds one document per line, a JSON object with a "text" string, named
    `<file>:<line number>` with the number zero-padded to 9 digits, so that names sort in line
    order. Any other file is one document, decoded as strict UTF-8.
    """
    paths = manifest_paths(raw_dir)
    if by_name:
        paths.sort(key=first_document_name)
    for path in paths:
        if path.endswith(JSONL_SUFFIX):
            yield from read_jsonl(raw_dir, path)
        else:
            yield Document(path, read_utf8(raw_dir / path))


def manifest_paths(raw_dir: Path) -> list[str]:
    """The paths of the files the download stage wrote, as its manifest lists them."""
    manifest_path = raw_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return [entry["path"] for entry in manifest["files"]]
    except FileNotFoundError:
        raise GptlabError(f"{manifest_path}: not found (run the download stage first)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise GptlabError(f"{manifest_path}: not a download manifest ({error})") from None


def jsonl_document_name(path: str, line: int) -> str:
    return f"{path}:{line:09d}"


def first_document_name(path: str) -> str:
    """The name of a file's first document: where its documents start in name order."""
    return jsonl_document_name(path, 1) if path.endswith(JSONL_SUFFIX) else path


def read_jsonl(raw_dir: Path, path: str) -> Iterator[Document]:
    """One document per line of a JSON-lines file: a {"text": ...} object, or a conversation
    {"messages": [{"role": ..., "content": ...}, ...]} (see gptlab.chat); any other line is an
    error naming the file and line (other keys of the object are ignored)."""
    with open(raw_dir / path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"{raw_dir / path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as error:  # UnicodeDecodeError included
                raise GptlabError(f"{where}: not a line of JSON ({error})") from None
            name = jsonl_document_name(path, number)
            if isinstance(record, dict) and "messages" in record:
                messages = conversation_of(record, where)
                yield Document(name, conversation_line(messages), conversation=True)
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise GptlabError(f'{where}: not a JSON object with a "text" string or a '
                                  f'"messages" list')
            yield Document(name, text)


def read_utf8(path: Path) -> str:
    """The text of `path`, refusing binary files and naming the first byte that is not UTF-8."""
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise GptlabError(f"{path}: looks binary (NUL byte at offset {nul}); not a text file")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise GptlabError(f"{path}: not valid UTF-8 at byte offset {error.start} "
                          f"(convert it, e.g. iconv -f latin1 -t utf-8)") from None


def contents(doc: Document) -> list[str]:
    """The contents of a conversation document's messages, in order."""
    return [message["content"] for message in json.loads(doc.text)["messages"]]


def open_text(path: Path, mode: str = "r") -> TextIO:
    """A UTF-8 text file with no newline translation: the text is written and read exactly."""
    return open(path, mode, encoding="utf-8", newline="")
