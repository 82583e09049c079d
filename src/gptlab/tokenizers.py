"""Tokenizers behind one interface: char, byte-level BPE, and tiktoken encodings.

Each saves to and loads from one JSON file (no pickle), holding everything needed to rebuild it;
its `fingerprint` ties token files to the exact tokenizer that wrote them. TOKENIZERS maps each
kind (params' tokenizer.kind, the definition's "kind") to its class: the one place a kind is
looked up, to build a tokenizer from the corpus or to rebuild one from its definition.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptlab.chat import CHAT_TOKENS
from gptlab.errors import GptlabError
from gptlab.io import write_json
from gptlab.params import TokenizerParams

EOT_TOKEN = "<|endoftext|>"
# Small chunks keep every core busy: the BPE encoder is faster on many short texts.
TEXT_CHUNK_CHARS = 1 << 16


class Tokenizer(ABC):
    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id is below it."""

    @property
    @abstractmethod
    def eot_id(self) -> int | None:
        """Id of the end-of-text token, or None when the vocabulary has none."""

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of token ids."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of several texts; subclasses spread the work over all cores."""
        return [self.encode(text) for text in texts]

    @property
    def fingerprint(self) -> str:
        """Short stable hash of the tokenizer's definition."""
        canonical = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())


class CharTokenizer(Tokenizer):
    """One token per character; ids are positions in the sorted character set, as in nanoGPT."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise GptlabError("char tokenizer: the corpus has no characters")
        self.chars = "".join(sorted(set(chars)))
        # id of each code point up to the largest in the vocabulary, -1 where there is none: a
        # table lookup encodes several times faster than a search of the sorted characters.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._id_of_code = np.full(codes[-1] + 1, -1, dtype=np.int64)
        self._id_of_code[codes] = np.arange(len(codes))

    @classmethod
    def from_texts(cls, chunks: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for chunk in chunks:
            seen.update(chunk)
        return cls("".join(seen))

    @classmethod
    def from_corpus(cls, params: TokenizerParams, train: Iterable[str],
                    val: Iterable[str]) -> CharTokenizer:
        # Characters of both splits, as nanoGPT takes them from the whole input, so that a rare
        # character of the validation text is not an error.
        return cls.from_texts(itertools.chain(train, val))

    @classmethod
    def from_json(cls, definition: dict[str, Any]) -> CharTokenizer:
        return cls(definition["chars"])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> None:
        return None

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        last = len(self._id_of_code) - 1
        ids = self._id_of_code[np.minimum(codes, last)]
        unknown = (ids < 0) | (codes > last)
        if unknown.any():
            char = chr(int(codes[np.argmax(unknown)]))
            raise GptlabError(f"character {char!r} (U+{ord(char):04X}) is not in the char "
                              f"tokenizer's vocabulary of {self.vocab_size} characters")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GptlabError(f"token id {bad[0]} is outside the char vocabulary of "
                              f"{self.vocab_size}")
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) trained with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        # "<|endoftext|>" written in the corpus is text, not the control token (as tiktoken's
        # encode_ordinary); the eot id is only ever inserted on purpose.
        self._hf.encode_special_tokens = True

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(chunks, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_corpus(cls, params: TokenizerParams, train: Iterable[str],
                    val: Iterable[str]) -> BPETokenizer:
        return cls.train(train, params.vocab_size)  # the validation text stays unseen

    @classmethod
    def from_json(cls, definition: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(definition["tokenizer"])))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self._hf.token_to_id(EOT_TOKEN)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self._hf.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # The Rust side encodes the batch on all cores.
        return [np.array(e.ids, dtype=np.int64) for e in self._hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size,
                "tokenizer": json.loads(self._hf.to_str())}


class TiktokenTokenizer(Tokenizer):
    """A ready-made tiktoken encoding, such as gpt2 or cl100k_base."""

    kind = "tiktoken"

    def __init__(self, encoding: str) -> None:
        import tiktoken

        try:
            self._encoding = tiktoken.get_encoding(encoding)
        except ValueError:
            known = ", ".join(tiktoken.list_encoding_names())
            raise GptlabError(f"tokenizer.encoding: unknown tiktoken encoding {encoding!r} "
                              f"(known: {known})") from None
        except Exception as error:  # tiktoken fetches encodings over the network at first use
            raise GptlabError(f"tokenizer.encoding: cannot load tiktoken encoding {encoding!r}: "
                              f"{error} (tiktoken downloads it once; needs the internet)") from None
        self.encoding = encoding

    @classmethod
    def from_corpus(cls, params: TokenizerParams, train: Iterable[str],
                    val: Iterable[str]) -> TiktokenTokenizer:
        return cls(params.encoding)  # ready-made: nothing to learn

    @classmethod
    def from_json(cls, definition: dict[str, Any]) -> TiktokenTokenizer:
        return cls(definition["encoding"])

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self._encoding._special_tokens.get(EOT_TOKEN)

    def encode(self, text: str) -> np.ndarray:
        # Ordinary encoding: "<|endoftext|>" inside a corpus is text, not a control token.
        return np.array(self._encoding.encode_ordinary(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        batches = self._encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return [np.array(ids, dtype=np.int64) for ids in batches]

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "encoding": self.encoding}


# Each kind's class, which makes its tokenizers two ways: `from_corpus(params, train_chunks,
# val_chunks)` the one params choose, learnt from the clean text where the kind needs to (the
# chunks are read only if used), and `from_json(definition)` the one `to_json()` describes.
TOKENIZERS: dict[str, type[CharTokenizer | BPETokenizer | TiktokenTokenizer]] = {
    tokenizer.kind: tokenizer for tokenizer in (CharTokenizer, BPETokenizer, TiktokenTokenizer)
}


class ChatTokenizer(Tokenizer):
    """A tokenizer with the chat template's special tokens appended after its vocabulary: the
    ids of the vocabulary it extends are unchanged, so a model trained on it can be fine-tuned
    on conversations. Their text in what it encodes is those tokens, as transformers'
    tokenizers read added special tokens. Not a kind of its own: it has its base's kind, and a
    definition with "chat_tokens" is rebuilt as one around the base its kind names."""

    def __init__(self, base: Tokenizer) -> None:
        self.base = base
        self.special_ids = {token: base.vocab_size + i for i, token in enumerate(CHAT_TOKENS)}
        self._special = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.base.kind

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(CHAT_TOKENS)

    @property
    def eot_id(self) -> int | None:
        return self.base.eot_id

    def encode(self, text: str) -> np.ndarray:
        pieces = [np.array([self.special_ids[piece]]) if piece in self.special_ids
                  else self.base.encode(piece)
                  for piece in self._special.split(text) if piece]
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        text, run = [], []
        for i in map(int, ids):
            if i < self.base.vocab_size:
                run.append(i)
                continue
            text.append(self.base.decode(run))
            run = []
            if i >= self.vocab_size:
                raise GptlabError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
            text.append(CHAT_TOKENS[i - self.base.vocab_size])
        return "".join([*text, self.base.decode(run)])

    def to_json(self) -> dict[str, Any]:
        return {**self.base.to_json(), "vocab_size": self.vocab_size,
                "chat_tokens": list(CHAT_TOKENS)}


def chat_tokens_of(tokenizer: Tokenizer) -> ChatTokenizer | None:
    """The tokenizer as a ChatTokenizer when it has the chat template's tokens, else None: a
    model without them continues text rather than chats."""
    return tokenizer if isinstance(tokenizer, ChatTokenizer) else None


def without_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer whose vocabulary the chat tokens extend (itself when it has none)."""
    return tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer


def build_tokenizer(params: TokenizerParams, train_path: Path, val_path: Path,
                    chunks: Callable[[Path], Iterable[str]] | None = None) -> Tokenizer:
    """Make the tokenizer chosen in params, learning from the clean text (read by `chunks`,
    by default as plain text) where it needs to, or take that of params.from_model."""
    if params.from_model is not None:
        return model_tokenizer(Path(params.from_model))
    chunks = chunks or iter_text_chunks
    return TOKENIZERS[params.kind].from_corpus(params, chunks(train_path), chunks(val_path))


def model_tokenizer(models_dir: Path) -> Tokenizer:
    """The tokenizer of a gptlab models/ folder, without any chat tokens it has (the tokenize
    stage adds them to conversations' tokenizers only)."""
    try:
        tokenizer = load_tokenizer(models_dir / "tokenizer.json")
    except GptlabError as error:
        raise GptlabError(f"tokenizer.from_model: {error}") from None
    return without_chat_tokens(tokenizer)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Rebuild a tokenizer from the JSON file written by `Tokenizer.save`."""
    try:
        definition = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found (run the tokenize stage first)") from None
    except (OSError, ValueError) as error:
        raise GptlabError(f"{path}: not a gptlab tokenizer file ({error})") from None
    try:
        return tokenizer_from_definition(definition)
    except GptlabError as error:
        raise GptlabError(f"{path}: {error}") from None


def tokenizer_from_definition(definition: Any) -> Tokenizer:
    """Rebuild a tokenizer from its `to_json()` definition."""
    kind = definition.get("kind") if isinstance(definition, dict) else None
    if kind not in TOKENIZERS:
        raise GptlabError(f"unknown tokenizer kind {kind!r}; expected one of "
                          f"{sorted(TOKENIZERS)}")
    try:
        base = TOKENIZERS[kind].from_json(definition)
        if "chat_tokens" not in definition:
            return base
        if definition["chat_tokens"] != list(CHAT_TOKENS):
            raise GptlabError(f"chat tokens {definition['chat_tokens']} are not this gptlab's "
                              f"{list(CHAT_TOKENS)}")
        return ChatTokenizer(base)
    except GptlabError:
        raise
    except Exception as error:  # a damaged definition can fail deep inside tokenizers' Rust code
        raise GptlabError(f"damaged {kind} tokenizer definition ({error})") from None


def split_at_lines(text: str, chunk_chars: int) -> Iterator[str]:
    """Pieces of `text` of at most `chunk_chars`, each ending at a line break (a line longer
    than that is one piece): BPE and tiktoken encode many short texts faster than one long."""
    start = 0
    while start < len(text):
        end = start + chunk_chars
        cut = text.rfind("\n", start, end) + 1
        if end >= len(text):
            cut = len(text)
        elif cut <= start:  # no line break within reach: take the line whole
            cut = text.find("\n", end) + 1 or len(text)
        yield text[start:cut]
        start = cut


def iter_text_chunks(path: Path, chunk_chars: int = TEXT_CHUNK_CHARS) -> Iterator[str]:
    """Read a text file in pieces of about `chunk_chars`, each ending at a line break, so a
    corpus larger than memory streams through and no word is cut in two."""
    carry = ""
    with open(path, encoding="utf-8", newline="") as f:
        while block := f.read(chunk_chars):
            block = carry + block
            cut = block.rfind("\n") + 1
            if cut == 0:
                carry = block
                continue
            carry = block[cut:]
            yield block[:cut]
    if carry:
        yield carry
