"""What each params.yaml key means, written from the schema in gptlab.params, the one place it is
said: `gptlab params --explain KEY`, docs/parameters.md, and params.yaml's comments (which
`dvc exp run -S` drops when it rewrites the file).

A description is a field's comment in params.yaml with its line breaks taken out, except
between items: "pip   - a package ..." starts an item, whose wrapped lines align after the dash.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gptlab.errors import GptlabError
from gptlab.params import Params, is_section

# The width params.yaml's comments (and `--explain`'s lines) are wrapped to.
LINE_WIDTH = 94
KEY_LINE = re.compile(r"^( *)([A-Za-z_]\w*):(?: |$)")
LIST_ITEM = re.compile(r"^\S+ +- ")
LIMITS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
DOCS_HEADER = """\
# Parameters

Every key of `params.yaml`: what it means, the values it takes, and the value the project ships
with. Each stage reads only its own sections (see `dvc.yaml`), so changing a value reruns just
the stages that depend on it; every key is required. `gptlab params --explain KEY` prints one
key's entry, e.g. `gptlab params --explain model.n_layer`.

This page and the comments of `params.yaml` are written from the schema in
`src/gptlab/params.py` by `make params-docs`; edit the descriptions there.
"""


def schema_fields(section: type[BaseModel] = Params, prefix: str = "") -> dict[str, FieldInfo]:
    """Every key of the schema by its dotted name, sections included, in params.yaml's order."""
    fields = {}
    for name, field in section.model_fields.items():
        fields[prefix + name] = field
        if is_section(field.annotation):
            fields.update(schema_fields(field.annotation, f"{prefix}{name}."))
    return fields


def explain(key: str) -> str:
    """A key's meaning, type, allowed values and default; a section's meaning and keys."""
    fields = schema_fields()
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GptlabError(f"unknown key {key!r}{hint}; docs/parameters.md lists every key")
    field = fields[key]
    lines = [key, *(f"  {line}" for line in wrapped(field.description, LINE_WIDTH - 2))]
    if is_section(field.annotation):
        lines.append(f"  keys: {', '.join(field.annotation.model_fields)}")
    else:
        lines += [f"  type:    {type_name(field.annotation)}",
                  f"  allowed: {allowed_values(field)}",
                  f"  default: {default_text(field)}"]
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """The YAML type of a key: integer, number, text, boolean, list of ..., ... or null."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is Literal:
        return "text"
    return {bool: "boolean", int: "integer", float: "number", str: "text",
            NoneType: "null"}[annotation]


def allowed_values(field: FieldInfo) -> str:
    """The values a key accepts beyond its type: a choice, a range, or any."""
    if field.annotation is bool:
        return "true | false"
    choices = literal_choices(field.annotation)
    if choices:
        if get_origin(field.annotation) is list:
            return f"any of {', '.join(choices)}"
        return " | ".join(choices)
    # pydantic keeps Field(ge=1, ...) as annotated_types constraints, one attribute each.
    limits = [f"{symbol} {getattr(constraint, name)}" for constraint in field.metadata
              for name, symbol in LIMITS.items() if hasattr(constraint, name)]
    if limits:
        return " and ".join(limits)
    if any(hasattr(constraint, "min_length") for constraint in field.metadata):
        return "not empty"
    return "any"


def literal_choices(annotation: Any) -> list[str]:
    """The choices of a Literal key, or of a list of Literals; empty for any other."""
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return [str(choice) for choice in get_args(annotation)]
    return []


def default_text(field: FieldInfo) -> str:
    # JSON is YAML: the value as params.yaml (or `dvc exp run -S key=VALUE`) would take it.
    return json.dumps(field.json_schema_extra["default"])


def render_docs() -> str:
    """docs/parameters.md: one table per section, in params.yaml's order."""
    fields = schema_fields()
    sections = {"": "Keys of the top level."}
    sections.update({key: field.description for key, field in fields.items()
                     if is_section(field.annotation)})
    parts = [DOCS_HEADER]
    for section, description in sections.items():
        keys = [key for key, field in fields.items()
                if key.rpartition(".")[0] == section and not is_section(field.annotation)]
        heading = "#" * (2 + section.count(".")) + f" `{section}`" if section else "## Top level"
        parts.append(f"\n{heading}\n\n{markdown_text(description)}\n\n"
                     "| key | type | allowed | default | meaning |\n|---|---|---|---|---|\n")
        parts.extend(table_row(key, fields[key]) for key in keys)
    return "".join(parts)


def table_row(key: str, field: FieldInfo) -> str:
    # Inside a code span only the table's pipes need escaping.
    default = default_text(field).replace("|", r"\|")
    return (f"| `{key}` | {cell(type_name(field.annotation))} | {cell(allowed_values(field))} | "
            f"`{default}` | {cell(field.description)} |\n")


def markdown_text(text: str) -> str:
    # Literal asterisks (globs, products) rather than emphasis.
    return text.replace("*", r"\*")


def cell(text: str) -> str:
    """Text inside a table cell: pipes escaped, an item per line."""
    return markdown_text(text).replace("|", r"\|").replace("\n", "<br>")


def with_comments(text: str) -> str:
    """A params file with the comment above each known key written from the schema; every other
    line (values, the file's opening comment, blank lines) kept byte for byte."""
    fields = schema_fields()
    lines: list[str] = []
    parents: list[tuple[int, str]] = []
    for line in text.splitlines(keepends=True):
        match = KEY_LINE.match(line)
        if match:
            indent = len(match[1])
            while parents and parents[-1][0] >= indent:
                parents.pop()
            parents.append((indent, match[2]))
            key = ".".join(name for _, name in parents)
            if key in fields:
                while lines and lines[-1].lstrip().startswith("#"):
                    lines.pop()
                lines += comment_lines(fields[key].description, indent)
        lines.append(line)
    return "".join(lines)


def comment_lines(description: str, indent: int) -> list[str]:
    """A description as YAML comment lines at `indent`, wrapped to the file's width."""
    return [f"{' ' * indent}# {line}\n" for line in wrapped(description, LINE_WIDTH - indent - 2)]


def wrapped(description: str, width: int) -> list[str]:
    """A description's lines at most `width` long (an item's continuation aligned after its
    dash), never breaking inside a `code span`."""
    lines = []
    for item in description.splitlines():
        start = LIST_ITEM.match(item)
        unbreakable = re.sub(r"`[^`]*`", lambda span: span[0].replace(" ", "\0"), item)
        lines += [line.replace("\0", " ") for line in textwrap.wrap(
            unbreakable, width, subsequent_indent=" " * (start.end() if start else 0),
            break_long_words=False, break_on_hyphens=False)]
    return lines
