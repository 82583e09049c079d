"""Conversations: how they are read, and the chat template that turns them into tokens.

A conversation is one JSON line, `{"messages": [{"role": "user", "content": "..."}, ...]}`, the
format of Hugging Face chat datasets. The template writes each message as its role's special
token, its content and the end-of-turn token, with nothing between:

    <|user|>olleh<|end|><|assistant|>hello<|end|>

A model learns to answer by reading `<|assistant|>` and writing until `<|end|>`. The special
tokens are appended after a tokenizer's own vocabulary (see gptlab.tokenizers), so the ids of
a pretrained model's vocabulary keep their meaning. The loss mask marks what the model is
taught to write: the content of every assistant message and its `<|end|>`; the role tokens,
the user's and system's messages count for nothing.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
# The special tokens, in the order their ids follow the vocabulary they are added to.
CHAT_TOKENS = (*(f"<|{role}|>" for role in ROLES), END_OF_TURN)
# The same template for transformers' apply_chat_template (exported in tokenizer_config.json).
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Loss-mask bits, one byte per token: the token is a target the loss counts; a conversation
# starts at this token (where training windows start).
COUNTED = 1
START = 2

Message = dict[str, str]


def conversation_of(record: Any, where: str) -> list[Message]:
    """The messages of one parsed JSON line, checked: roles known, contents strings, at least
    one assistant message (a conversation with nothing to learn is a mistake in the data)."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise GptlabError(f'{where}: not a JSON object with a non-empty "messages" list')
    for number, message in enumerate(messages, start=1):
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):
            raise GptlabError(f"{where}: message {number} is not a {{\"role\": one of "
                              f"{', '.join(ROLES)}, \"content\": a string}} object")
    if not any(message["role"] == "assistant" for message in messages):
        raise GptlabError(f"{where}: no assistant message (nothing to learn from)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_line(messages: list[Message]) -> str:
    """A conversation as the one JSON line the clean stage writes (and reads back)."""
    return json.dumps({"messages": messages}, ensure_ascii=False)


def read_conversations(path: Path) -> Iterator[list[Message]]:
    """The conversations of a JSON-lines file, one per line; blank lines are skipped."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as error:
                raise GptlabError(f"{where}: not a line of JSON ({error})") from None
            yield conversation_of(record, where)


def message_contents(path: Path) -> Iterator[str]:
    """The contents of every message of a conversations file: what a tokenizer learns from."""
    for messages in read_conversations(path):
        yield from (message["content"] for message in messages)


def render(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The template's text of a conversation (what apply_chat_template returns), optionally
    followed by the assistant's role token, to have the model answer."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END_OF_TURN}" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def segments(messages: list[Message]) -> Iterator[tuple[str, bool]]:
    """The rendered text in pieces, each with whether the loss counts its tokens."""
    for message in messages:
        answer = message["role"] == "assistant"
        yield f"<|{message['role']}|>", False
        yield message["content"] + END_OF_TURN, answer


def encode_conversation(tokenizer: Any, messages: list[Message],
                        answers_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a rendered conversation and their loss mask (COUNTED on assistant tokens,
    or on every token but the first if not `answers_only`; START on the first)."""
    pieces = [(tokenizer.encode(text), counted or not answers_only)
              for text, counted in segments(messages)]
    ids = np.concatenate([piece for piece, _ in pieces])
    mask = np.concatenate([np.full(len(piece), COUNTED if counted else 0, dtype=np.uint8)
                           for piece, counted in pieces])
    mask[0] = START  # no loss on a conversation's first token: nothing comes before it
    return ids, mask


def reverse_words(count: int, seed: int, min_letters: int = 3,
                  max_letters: int = 6) -> list[list[Message]]:
    """`count` distinct conversations asking for a random lowercase word spelled backwards:
    a skill with one right answer that a small character model learns in minutes."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        length = rng.randint(min_letters, max_letters)
        words["".join(rng.choice(string.ascii_lowercase) for _ in range(length))] = None
    return [[{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]
            for word in words]


def fit_turns(tokenizer: Any, messages: list[Message], context: int) -> list[int]:
    """The prompt of a conversation for the model's answer: the oldest messages left out until
    it fits in `context` tokens with room for an answer (the last message is always kept,
    cut from its start if it alone is too long)."""
    while True:
        ids = tokenizer.encode(render(messages, add_generation_prompt=True)).tolist()
        if len(ids) < context or len(messages) == 1:
            return ids[-(context - 1):]
        messages = messages[1:]
