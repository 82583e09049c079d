"""Normalising a document's text with the steps params choose: line endings, Unicode form,
Project Gutenberg's headers and licence notices, case and white space."""

from __future__ import annotations

import json
import re
import unicodedata

from gptlab.chat import conversation_line
from gptlab.clean.documents import Document
from gptlab.params import CleanParams

# The lines that start and end a Project Gutenberg text: each pattern is a marker, and the line
# holding it is `^.*(marker).*$` (see `search_line`).
_GUTENBERG_START = re.compile(
    r"\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!", re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg", re.IGNORECASE
)
# The Moby Shakespeare's copyright notice, repeated between scenes in some Gutenberg texts.
_LICENCE_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def cleaned(doc: Document, params: CleanParams) -> Document:
    """The document normalised; a conversation, message by message (its JSON untouched)."""
    if not doc.conversation:
        return Document(doc.name, normalize(doc.text, params))
    messages = [{**message, "content": normalize(message["content"], params)}
                for message in json.loads(doc.text)["messages"]]
    return Document(doc.name, conversation_line(messages), conversation=True)


def normalize(text: str, params: CleanParams) -> str:
    """Apply the cleaning steps chosen in params, in a fixed order."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if params.unicode != "none":
        text = unicodedata.normalize(params.unicode, text)
    if params.strip_boilerplate:
        text = strip_gutenberg(text)
    if params.lowercase:
        text = text.lower()
    if params.collapse_whitespace:
        text = collapse_whitespace(text)
    return text


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices, keeping the work itself."""
    start = search_line(_GUTENBERG_START, text)
    if start:
        text = text[start.end() :]
    end = search_line(_GUTENBERG_END, text)
    if end:
        text = text[: end.start()]
    text = _LICENCE_NOTICE.sub("", text)
    return text.strip("\n") + "\n" if start or end else text


def search_line(marker: re.Pattern, text: str) -> re.Match | None:
    """The first line holding `marker` (the match of `^.*(marker).*$`, multi-line, which also
    runs on to the end of a later line where the marker spans lines).

    Searching for the marker first and matching the line pattern only where it is found gives
    the same match as searching with the line pattern, whose `^.*` is otherwise tried at every
    line and backtracked over every character: a few times slower.
    """
    found = marker.search(text)
    if found is None:
        return None
    line = re.compile(rf"^.*({marker.pattern}).*$", marker.flags | re.MULTILINE)
    return line.match(text, text.rfind("\n", 0, found.start()) + 1)


def collapse_whitespace(text: str) -> str:
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
