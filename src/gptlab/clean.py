"""Turn raw files into clean train and validation text: normalise, deduplicate, then split.

Deduplication happens before the split and the split is by whole document, so no copy of a
validation text can sit in the training set; `leak_fraction` measures how well that worked.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError
from gptlab.params import CleanParams

# Words per shingle when comparing editions: short enough to survive a spelling change every
# few words, long enough that two different plays share few of them.
NEAR_SHINGLE_WORDS = 3
# Words per shingle of the leak check, as in the GPT-3 paper's contamination analysis.
LEAK_SHINGLE_WORDS = 13
MINHASH_PERMUTATIONS = 128
# 64 bands of 2 rows make any pair with Jaccard similarity above ~0.1 a candidate almost
# surely; candidates are then checked exactly, so a low bar costs time, never accuracy.
MINHASH_BANDS = 64
MINHASH_SEED = 0x5EED

_GUTENBERG_START = re.compile(
    r"^.*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
# The Moby Shakespeare's copyright notice, repeated between scenes in some Gutenberg texts.
_LICENCE_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)
_WORD = re.compile(r"[^\W\d_]+")
_FOLIO_LETTERS = str.maketrans("vjy", "uii")
_DOUBLED_LETTER = re.compile(r"([^\W\d_])\1+")
_FINAL_E = re.compile(r"\b(\w\w+)e\b")


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Cluster:
    """Documents found to be one work; `kept` survives, the others are dropped."""

    kept: str
    removed: dict[str, float] = field(default_factory=dict)  # name -> containment


@dataclass
class CleanResult:
    train_text: str
    val_text: str
    metrics: dict
    report: dict


def clean_corpus(raw_dir: Path, params: CleanParams) -> CleanResult:
    """Read every raw file listed in the manifest and produce the train and val text."""
    raw = read_documents(raw_dir)
    cleaned = [Document(d.name, normalize(d.text, params)) for d in raw]
    kept = [d for d in cleaned if len(d.text) >= params.min_chars]
    short = sorted(d.name for d in cleaned if len(d.text) < params.min_chars)
    if not kept:
        raise GptlabError(f"{raw_dir}: no document has clean.min_chars={params.min_chars} "
                          f"characters after cleaning ({len(raw)} read); lower clean.min_chars "
                          f"or check data.spec and data.include")
    exact: list[Cluster] = []
    near: list[Cluster] = []
    if params.dedupe in ("exact", "near"):
        kept, exact = drop_exact_duplicates(kept)
    if params.dedupe == "near":
        kept, near = drop_near_duplicates(kept, params.near_threshold)
    if params.split == "tail":
        train_text, val_text = split_tail(join_documents(kept), params.val_fraction)
        train_docs, val_docs = kept, []
    else:
        train_docs, val_docs = split_documents(kept, params.val_fraction, params.split_seed)
        train_text, val_text = join_documents(train_docs), join_documents(val_docs)
    metrics = {
        "docs_in": len(raw),
        "docs_short": len(short),
        "docs_exact_duplicates": sum(len(c.removed) for c in exact),
        "docs_near_duplicates": sum(len(c.removed) for c in near),
        "docs_kept": len(kept),
        "near_clusters": len(near),
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "leak_fraction": round(leak_fraction(train_text, val_text), 6),
    }
    report = {
        "short": short,
        "exact_duplicates": [vars(c) for c in exact],
        "near_duplicates": [vars(c) for c in near],
        "train": [d.name for d in train_docs],
        "val": [d.name for d in val_docs],
    }
    return CleanResult(train_text, val_text, metrics, report)


# ---------------------------------------------------------------------------------------------
# reading and normalising


def read_documents(raw_dir: Path) -> list[Document]:
    """Each file of the download manifest as one document, decoded as strict UTF-8."""
    manifest_path = raw_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = [entry["path"] for entry in manifest["files"]]
    except FileNotFoundError:
        raise GptlabError(f"{manifest_path}: not found (run the download stage first)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise GptlabError(f"{manifest_path}: not a download manifest ({error})") from None
    return [Document(name, read_utf8(raw_dir / name)) for name in names]


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
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _LICENCE_NOTICE.sub("", text)
    return text.strip("\n") + "\n" if start or end else text


def collapse_whitespace(text: str) -> str:
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def join_documents(docs: list[Document]) -> str:
    """Concatenate documents, each ending in a newline, separated by one blank line."""
    return "\n".join(d.text if d.text.endswith("\n") else d.text + "\n" for d in docs)


# ---------------------------------------------------------------------------------------------
# deduplication


def drop_exact_duplicates(docs: list[Document]) -> tuple[list[Document], list[Cluster]]:
    """Keep the first of documents whose text is equal up to white space."""
    first_by_key: dict[str, Document] = {}
    clusters: dict[str, Cluster] = {}
    for doc in sorted(docs, key=lambda d: d.name):
        key = hashlib.sha256(" ".join(doc.text.split()).encode()).hexdigest()
        if key in first_by_key:
            kept = first_by_key[key].name
            clusters.setdefault(kept, Cluster(kept)).removed[doc.name] = 1.0
        else:
            first_by_key[key] = doc
    return list(first_by_key.values()), list(clusters.values())


def drop_near_duplicates(
    docs: list[Document], threshold: float
) -> tuple[list[Document], list[Cluster]]:
    """Group documents that are the same work and keep the longest of each group.

    Similarity is containment: the fraction of the smaller document's word 3-grams found in the
    other, after folding Early Modern spelling, so a First Folio edition matches its modern
    edition while two different plays stay apart. MinHash with banding proposes candidate
    pairs, so the cost grows with the number of similar pairs, not with all pairs.
    """
    shingles = [shingle_hashes(fold_words(d.text), NEAR_SHINGLE_WORDS) for d in docs]
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
        best = min(members, key=lambda i: (-len(docs[i].text), docs[i].name))
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
    text = _DOUBLED_LETTER.sub(r"\1", text.lower().translate(_FOLIO_LETTERS))
    return _FINAL_E.sub(r"\1", " ".join(_WORD.findall(text))).split()


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
    return np.unique(combined)


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
# splitting and leak check


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """The last `val_fraction` of the characters is validation, exactly as nanoGPT splits."""
    cut = int(len(text) * (1 - val_fraction))
    if cut == 0 or cut == len(text):
        raise GptlabError(f"clean.val_fraction: {val_fraction} leaves an empty split of a "
                          f"{len(text)}-character corpus")
    return text[:cut], text[cut:]


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Assign whole documents to val, in a seeded random order, until val is closest to
    `val_fraction` of all characters; the rest is train."""
    if len(docs) < 2:
        raise GptlabError(f"clean.split: 'documents' needs at least 2 documents, got {len(docs)} "
                          f"(use split: tail for a single-file corpus)")
    order = sorted(docs, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(d.text) for d in docs)
    val_names: set[str] = set()
    val_chars = 0
    for doc in order:
        if len(val_names) == len(docs) - 1:
            break
        if abs(val_chars + len(doc.text) - target) < abs(val_chars - target):
            val_names.add(doc.name)
            val_chars += len(doc.text)
    if not val_names:  # every document alone overshoots: take the one nearest the target
        val_names.add(min(order, key=lambda d: abs(len(d.text) - target)).name)
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return sorted(train, key=lambda d: d.name), sorted(val, key=lambda d: d.name)


def leak_fraction(train_text: str, val_text: str) -> float:
    """Fraction of validation 13-word shingles that also occur in the training text.

    Words are spelling-folded as for near-dedupe, so a validation play whose other edition is
    in the training set counts as leaked even where the spelling differs.
    """
    val = shingle_hashes(fold_words(val_text), LEAK_SHINGLE_WORDS)
    if len(val) == 0:
        return 0.0
    train = shingle_hashes(fold_words(train_text), LEAK_SHINGLE_WORDS)
    return len(np.intersect1d(val, train, assume_unique=True)) / len(val)
