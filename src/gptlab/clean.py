"""Turn raw files into clean train and validation text: normalise, deduplicate, then split.

Deduplication happens before the split and the split is by whole document, so no copy of a
validation text can sit in the training set; `leak_fraction` measures how well that worked.

A corpus can be larger than memory (a JSON-lines file holds one document per line), so it is
streamed twice. Pass 1 reads and normalises each document and keeps only its `Facts` (name,
length, exact-dedupe key); which documents are kept and where each goes are decided from those;
pass 2 reads and normalises the documents again and writes the kept ones straight into
train.txt and val.txt. Memory grows with the number of documents (about 250 bytes each), not
with their text; one document must fit in memory. `dedupe: near` is the exception: it keeps the
word 3-gram hashes of every document (about 1.5 bytes per character of text), so it is for
corpora that fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from gptlab.chat import conversation_line, conversation_of
from gptlab.errors import GptlabError
from gptlab.params import CleanParams

# Words per shingle when comparing editions: short enough to survive a spelling change every
# few words, long enough that two different plays share few of them.
NEAR_SHINGLE_WORDS = 3
# Words per shingle of the leak check, as in the GPT-3 paper's contamination analysis.
LEAK_SHINGLE_WORDS = 13
# The leak check holds at most this many validation shingles (8 MB of hashes): past it, the
# ones with the smallest hashes, a uniform random sample, so the fraction is an estimate with a
# standard error under 0.0005. The default corpus has about 100,000: it is measured exactly.
LEAK_MAX_VAL_SHINGLES = 1_000_000
# Characters of text the leak check folds into words at a time: about 15 MB of word lists.
LEAK_CHUNK_CHARS = 1 << 19
MINHASH_PERMUTATIONS = 128
# 64 bands of 2 rows make any pair with Jaccard similarity above ~0.1 a candidate almost
# surely; candidates are then checked exactly, so a low bar costs time, never accuracy.
MINHASH_BANDS = 64
MINHASH_SEED = 0x5EED
# Each list of report.json (names, clusters) holds at most this many entries, since a JSON-lines
# corpus can have millions of documents; a cut list's full length is under "truncated".
REPORT_MAX_ITEMS = 1000
JSONL_SUFFIX = ".jsonl"

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
_WORD = re.compile(r"[^\W\d_]+")
_FOLIO_LETTERS = str.maketrans("vjy", "uii")
_DOUBLED_LETTER = re.compile(r"([^\W\d_])\1+")


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


@dataclass
class Cluster:
    """Documents found to be one work; `kept` survives, the others are dropped."""

    kept: str
    removed: dict[str, float] = field(default_factory=dict)  # name -> containment


@dataclass
class CleanResult:
    metrics: dict
    report: dict


def clean_corpus(raw_dir: Path, params: CleanParams, out_dir: Path) -> CleanResult:
    """Clean the raw files listed in the manifest into out_dir/train.txt and out_dir/val.txt."""
    # Pass 2 writes documents in reading order, so read them in the order they are joined in:
    # by name, except that a tail split of an undeduplicated corpus keeps the manifest's order.
    by_name = params.dedupe != "none" or params.split != "tail"
    facts = read_facts(raw_dir, params, by_name)
    kept = [f for f in facts if f.chars >= params.min_chars]
    short = sorted(f.name for f in facts if f.chars < params.min_chars)
    if not kept:
        raise GptlabError(f"{raw_dir}: no document has clean.min_chars={params.min_chars} "
                          f"characters after cleaning ({len(facts)} read); lower clean.min_chars "
                          f"or check data.spec and data.include")
    exact: list[Cluster] = []
    near: list[Cluster] = []
    if params.dedupe in ("exact", "near"):
        kept, exact = drop_exact_duplicates(kept)
    if params.dedupe == "near":
        kept, near = drop_near_duplicates(kept, params.near_threshold)
        for f in facts:
            f.shingles = None  # needed no more: free them before pass 2
    conversations = corpus_of_conversations(kept, raw_dir)
    if conversations and params.split == "tail":
        raise GptlabError("clean.split: tail would cut a conversation in two; use documents "
                          "(each conversation goes whole to train or val)")
    cut = None
    if params.split == "tail":
        total = joined_chars(kept)
        cut = tail_cut(total, params.val_fraction)
        train_docs, val_docs = kept, []
        train_chars, val_chars = cut, total - cut
    else:
        train_docs, val_docs = split_documents(kept, params.val_fraction, params.split_seed)
        train_chars, val_chars = joined_chars(train_docs), joined_chars(val_docs)
    for f in train_docs:
        f.split = "train"
    for f in val_docs:
        f.split = "val"
    suffix = ".jsonl" if conversations else ".txt"
    write_splits(raw_dir, params, facts, by_name, cut, out_dir, suffix)
    with (open_text(out_dir / f"train{suffix}") as train,
          open_text(out_dir / f"val{suffix}") as val):
        leak = leak_fraction(train, val)
    metrics = {
        "docs_in": len(facts),
        "docs_short": len(short),
        "docs_exact_duplicates": sum(len(c.removed) for c in exact),
        "docs_near_duplicates": sum(len(c.removed) for c in near),
        "docs_kept": len(kept),
        "near_clusters": len(near),
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_chars": train_chars,
        "val_chars": val_chars,
        "leak_fraction": round(leak, 6),
    }
    report = capped_lists({
        "short": short,
        "exact_duplicates": [vars(c) for c in exact],
        "near_duplicates": [vars(c) for c in near],
        "train": [f.name for f in train_docs],
        "val": [f.name for f in val_docs],
    })
    return CleanResult(metrics, report)


def corpus_of_conversations(docs: list[Facts], raw_dir: Path) -> bool:
    """Whether the kept documents are conversations (written to train.jsonl and val.jsonl) or
    text; a mix of the two is refused, since one tokenizer stage cannot make both."""
    kinds = {f.conversation for f in docs}
    if len(kinds) > 1:
        example = next(f.name for f in docs if f.conversation)
        raise GptlabError(f"{raw_dir}: a mix of conversations (such as {example}) and text; "
                          f"keep one kind (data.include)")
    return kinds == {True}


def capped_lists(lists: dict[str, list]) -> dict:
    """Each list cut to its first REPORT_MAX_ITEMS entries, and under "truncated" the full
    length of each list that was cut (no "truncated" entry when none was)."""
    capped: dict = {key: items[:REPORT_MAX_ITEMS] for key, items in lists.items()}
    truncated = {key: len(items) for key, items in lists.items() if len(items) > REPORT_MAX_ITEMS}
    if truncated:
        capped["truncated"] = truncated
    return capped


def open_text(path: Path, mode: str = "r") -> TextIO:
    """A UTF-8 text file with no newline translation: the text is written and read exactly."""
    return open(path, mode, encoding="utf-8", newline="")


# ---------------------------------------------------------------------------------------------
# reading and normalising


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


def read_facts(raw_dir: Path, params: CleanParams, by_name: bool) -> list[Facts]:
    """Pass 1: read and normalise every document, keeping only its facts, in reading order."""
    facts: list[Facts] = []
    for doc in read_documents(raw_dir, by_name):
        # Reading by name relies on a JSON-lines file's names sorting together, in line order.
        if by_name and facts and doc.name <= facts[-1].name:
            raise GptlabError(f"{raw_dir}: document {doc.name} is read after {facts[-1].name} "
                              f"but does not sort after it (a JSON-lines file of more than "
                              f"999,999,999 lines, or a file named like another file's line?)")
        facts.append(facts_of(cleaned(doc, params), params))
    return facts


def facts_of(doc: Document, params: CleanParams) -> Facts:
    """What deduplication and the split need to know of a cleaned document; a conversation is
    compared by its messages' contents, not by the JSON around them."""
    facts = Facts(doc.name, len(doc.text), doc.text.endswith("\n"), doc.conversation)
    if facts.chars < params.min_chars:
        return facts  # dropped as too short: nothing more is needed
    words = "\n".join(contents(doc)) if doc.conversation else doc.text
    if params.dedupe in ("exact", "near"):
        facts.key = exact_key(words)
    if params.dedupe == "near":
        facts.shingles = shingle_hashes(fold_words(words), NEAR_SHINGLE_WORDS)
    return facts


def contents(doc: Document) -> list[str]:
    """The contents of a conversation document's messages, in order."""
    return [message["content"] for message in json.loads(doc.text)["messages"]]


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


# ---------------------------------------------------------------------------------------------
# deduplication


def exact_key(text: str) -> bytes:
    """A hash of the text up to white space; 16 bytes make a collision practically impossible."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def drop_exact_duplicates(docs: list[Facts]) -> tuple[list[Facts], list[Cluster]]:
    """Keep the first of documents whose text is equal up to white space."""
    first_by_key: dict[bytes, Facts] = {}
    clusters: dict[str, Cluster] = {}
    for doc in sorted(docs, key=lambda d: d.name):
        if doc.key in first_by_key:
            kept = first_by_key[doc.key].name
            clusters.setdefault(kept, Cluster(kept)).removed[doc.name] = 1.0
        else:
            first_by_key[doc.key] = doc
    return list(first_by_key.values()), list(clusters.values())


def drop_near_duplicates(docs: list[Facts], threshold: float) -> tuple[list[Facts], list[Cluster]]:
    """Group documents that are the same work and keep the longest of each group.

    Similarity is containment: the fraction of the smaller document's word 3-grams found in the
    other, after folding Early Modern spelling, so a First Folio edition matches its modern
    edition while two different plays stay apart. MinHash with banding proposes candidate
    pairs, so the cost grows with the number of similar pairs, not with all pairs. Every
    document's shingles are in memory at once: this is for corpora that fit in memory.
    """
    shingles = [d.shingles for d in docs]
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    similarity: dict[int, float] = {}
    for i, j in minhash_candidates(shingles):
        score = containment(shingles[i], shingles[j])
        if score >= threshold:
            similarity[i] = max(similarity.get(i, 0.0), score)
            similarity[j] = max(similarity.get(j, 0.0), score)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(docs)):
        groups.setdefault(root(i), []).append(i)
    kept, clusters = [], []
    for members in groups.values():
        best = min(members, key=lambda i: (-docs[i].chars, docs[i].name))
        kept.append(docs[best])
        if len(members) > 1:
            removed = {docs[i].name: round(similarity[i], 4) for i in sorted(members) if i != best}
            clusters.append(Cluster(docs[best].name, removed))
    kept.sort(key=lambda d: d.name)
    clusters.sort(key=lambda c: c.kept)
    return kept, clusters


def fold_words(text: str) -> list[str]:
    """Lowercased words with Early Modern spelling folded onto modern forms.

    vnfold/unfold, liue/live, ioy/joy, selfe/self, haue/have and doubled letters are the most
    common differences between the First Folio and modern editions.
    """
    # No word spans white space and folding a word never looks past it, so each distinct
    # white-space-separated token is folded once: a few times faster on a large text.
    folded: dict[str, list[str]] = {}
    words: list[str] = []
    for token in text.lower().translate(_FOLIO_LETTERS).split():
        if token not in folded:
            folded[token] = [fold_word(word) for word in _WORD.findall(token)]
        words += folded[token]
    return words


def fold_word(word: str) -> str:
    """One lowercased word with doubled letters single and a final e dropped (selfe/self)."""
    word = _DOUBLED_LETTER.sub(r"\1", word)
    return word[:-1] if len(word) > 2 and word.endswith("e") else word


def shingle_hashes(words: list[str], n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of every run of `n` consecutive words (stable across runs)."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    vocab: dict[str, int] = {}
    for word in words:
        if word not in vocab:
            vocab[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest())
    ids = np.fromiter((vocab[w] for w in words), dtype=np.uint64, count=len(words))
    count = len(words) - n + 1
    combined = np.zeros(count, dtype=np.uint64)
    for offset in range(n):
        # Multiply-add with wraparound: an order-sensitive combination of the word hashes.
        combined = combined * np.uint64(0x100000001B3) + ids[offset : offset + count]
    return sorted_unique(combined)


def sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """np.unique by sorting: NumPy 2.3+ finds unique values by hashing, which is ~100x slower
    than a sort for arrays of random 64-bit values."""
    hashes = np.sort(hashes)
    first = np.ones(len(hashes), dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    return hashes[first]


def containment(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the smaller set of shingles that also occurs in the larger."""
    smaller = min(len(a), len(b))
    if smaller == 0:
        return 0.0
    return len(np.intersect1d(a, b, assume_unique=True)) / smaller


def minhash_candidates(shingles: list[np.ndarray]) -> list[tuple[int, int]]:
    """Pairs of documents that share at least one MinHash band, in a stable order."""
    rng = np.random.default_rng(MINHASH_SEED)
    multipliers = rng.integers(1, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
    offsets = rng.integers(0, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64)
    rows = MINHASH_PERMUTATIONS // MINHASH_BANDS
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for index, hashes in enumerate(shingles):
        if len(hashes) == 0:
            continue
        signature = np.array(
            [(hashes * a + b).min() for a, b in zip(multipliers, offsets, strict=True)],
            dtype=np.uint64,
        )
        for band in range(MINHASH_BANDS):
            key = (band, signature[band * rows : (band + 1) * rows].tobytes())
            buckets.setdefault(key, []).append(index)
    pairs = {
        (members[x], members[y])
        for members in buckets.values()
        for x in range(len(members))
        for y in range(x + 1, len(members))
    }
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------
# splitting


def joined_chars(docs: list[Facts]) -> int:
    """Length of the documents joined: each ending in a newline, separated by a blank line."""
    return sum(d.chars + (not d.ends_with_newline) for d in docs) + max(len(docs) - 1, 0)


def tail_cut(chars: int, val_fraction: float) -> int:
    """Where the last `val_fraction` of `chars` characters starts, exactly as nanoGPT splits."""
    cut = int(chars * (1 - val_fraction))
    if cut == 0 or cut == chars:
        raise GptlabError(f"clean.val_fraction: {val_fraction} leaves an empty split of a "
                          f"{chars}-character corpus")
    return cut


def split_documents(
    docs: list[Facts], val_fraction: float, seed: int
) -> tuple[list[Facts], list[Facts]]:
    """Assign whole documents to val, in a seeded random order, until val is closest to
    `val_fraction` of all characters; the rest is train."""
    if len(docs) < 2:
        raise GptlabError(f"clean.split: 'documents' needs at least 2 documents, got {len(docs)} "
                          f"(use split: tail for a single-file corpus)")
    order = sorted(docs, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(d.chars for d in docs)
    val_names: set[str] = set()
    val_chars = 0
    for doc in order:
        if len(val_names) == len(docs) - 1:
            break
        if abs(val_chars + doc.chars - target) < abs(val_chars - target):
            val_names.add(doc.name)
            val_chars += doc.chars
    if not val_names:  # every document alone overshoots: take the one nearest the target
        val_names.add(min(order, key=lambda d: abs(d.chars - target)).name)
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return sorted(train, key=lambda d: d.name), sorted(val, key=lambda d: d.name)


# ---------------------------------------------------------------------------------------------
# writing


def write_splits(
    raw_dir: Path, params: CleanParams, facts: list[Facts], by_name: bool, cut: int | None,
    out_dir: Path, suffix: str = ".txt",
) -> None:
    """Pass 2: read and normalise the documents again, in the order of pass 1, and write each
    kept one into train.txt or val.txt (conversations: a line each of train.jsonl or
    val.jsonl); with a tail `cut`, the joined text is cut there."""
    with (open_text(out_dir / f"train{suffix}", "w") as train,
          open_text(out_dir / f"val{suffix}", "w") as val):
        if suffix == ".jsonl":
            writers = {"train": LineWriter(train.write), "val": LineWriter(val.write)}
        elif cut is None:
            writers = {"train": JoinedWriter(train.write), "val": JoinedWriter(val.write)}
        else:  # a tail split marks every kept document "train"
            writers = {"train": JoinedWriter(TailCut(train, val, cut).write)}
        for doc, fact in zip(read_documents(raw_dir, by_name), facts, strict=True):
            if not fact.split:
                continue
            text = cleaned(doc, params).text
            # The split was decided on pass 1's reading: a file changed since would break it.
            if doc.name != fact.name or len(text) != fact.chars:
                raise GptlabError(f"{raw_dir}: {doc.name} changed while the clean stage read it "
                                  f"twice; run the stage again")
            writers[fact.split].add(text)


class JoinedWriter:
    """Writes documents as one text: each ending in a newline, separated by one blank line."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write
        self.empty = True

    def add(self, text: str) -> None:
        if not self.empty:
            self.write("\n")
        self.write(text if text.endswith("\n") else text + "\n")
        self.empty = False


class LineWriter:
    """Writes documents of one line each (conversations) as JSON lines."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write

    def add(self, text: str) -> None:
        self.write(text + "\n")


class TailCut:
    """A text stream whose first `cut` characters go to `head` and the rest to `tail`."""

    def __init__(self, head: TextIO, tail: TextIO, cut: int) -> None:
        self.head, self.tail = head, tail
        self.head_left = cut

    def write(self, text: str) -> None:
        take = min(self.head_left, len(text))
        self.head.write(text[:take])
        self.tail.write(text[take:])
        self.head_left -= take


# ---------------------------------------------------------------------------------------------
# leak check


def leak_fraction(
    train: TextIO, val: TextIO, chunk_chars: int = LEAK_CHUNK_CHARS,
    max_val_shingles: int = LEAK_MAX_VAL_SHINGLES,
) -> float:
    """Fraction of validation 13-word shingles that also occur in the training text.

    Words are spelling-folded as for near-dedupe, so a validation play whose other edition is
    in the training set counts as leaked even where the spelling differs. Both texts are read
    in chunks; of a validation text with more than `max_val_shingles` distinct shingles, a
    uniform sample of that many is checked.
    """
    val_hashes = smallest_shingle_hashes(val, max_val_shingles, chunk_chars)
    if len(val_hashes) == 0:
        return 0.0
    found = np.zeros(len(val_hashes), dtype=bool)
    for hashes in chunk_shingle_hashes(train, LEAK_SHINGLE_WORDS, chunk_chars):
        positions, present = sorted_lookup(val_hashes, hashes)
        found[positions[present]] = True
    return int(found.sum()) / len(val_hashes)


def smallest_shingle_hashes(text: TextIO, count: int, chunk_chars: int) -> np.ndarray:
    """The `count` smallest distinct 13-word shingle hashes of a text, sorted: all of them for a
    shorter text, else a uniform random sample, since the hashes are pseudo-random."""
    smallest = np.zeros(0, dtype=np.uint64)
    for hashes in chunk_shingle_hashes(text, LEAK_SHINGLE_WORDS, chunk_chars):
        if len(smallest) == count:
            hashes = hashes[hashes < smallest[-1]]  # the others cannot be among the smallest
        # Inserted in place rather than merged and sorted: one copy of `smallest`, not three.
        positions, present = sorted_lookup(smallest, hashes)
        smallest = np.insert(smallest, positions[~present], hashes[~present])[:count]
    return smallest


def sorted_lookup(table: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `values`, where it is (or would go) in the sorted `table`, and whether it is
    there."""
    positions = np.searchsorted(table, values)
    present = np.zeros(len(values), dtype=bool)
    inside = positions < len(table)
    present[inside] = table[positions[inside]] == values[inside]
    return positions, present


def chunk_shingle_hashes(text: TextIO, n: int, chunk_chars: int) -> Iterator[np.ndarray]:
    """The hashes of the text's n-word shingles (spelling-folded), one array per chunk of text;
    together they are exactly the shingles of the whole text."""
    carry: list[str] = []
    for chunk in word_aligned_chunks(text, chunk_chars):
        words = carry + fold_words(chunk)
        yield shingle_hashes(words, n)
        # The last n-1 words start shingles that end in the next chunk.
        carry = words[max(len(words) - n + 1, 0) :]


def word_aligned_chunks(text: TextIO, chunk_chars: int) -> Iterator[str]:
    """The text in pieces of about `chunk_chars` characters, each ending after a space or a
    newline, so that no word (and no word-folding step) spans two pieces."""
    rest = ""
    while block := text.read(chunk_chars):
        block = rest + block
        end = max(block.rfind(" "), block.rfind("\n")) + 1
        rest = block[end:]
        if end:
            yield block[:end]
    if rest:
        yield rest
