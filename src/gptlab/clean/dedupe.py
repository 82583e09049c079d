"""Deduplication: exact (equal text up to white space) and near (the same work in another
edition: word 3-gram containment after folding Early Modern spelling, candidates from
MinHash), and the spelling-folded word shingles the leak check shares."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from gptlab.clean.documents import Facts

# Words per shingle when comparing editions: short enough to survive a spelling change every
# few words, long enough that two different plays share few of them.
NEAR_SHINGLE_WORDS = 3
MINHASH_PERMUTATIONS = 128
# 64 bands of 2 rows make any pair with Jaccard similarity above ~0.1 a candidate almost
# surely; candidates are then checked exactly, so a low bar costs time, never accuracy.
MINHASH_BANDS = 64
MINHASH_SEED = 0x5EED
_WORD = re.compile(r"[^\W\d_]+")
_FOLIO_LETTERS = str.maketrans("vjy", "uii")
_DOUBLED_LETTER = re.compile(r"([^\W\d_])\1+")


@dataclass
class Cluster:
    """Documents found to be one work; `kept` survives, the others are dropped."""

    kept: str
    removed: dict[str, float] = field(default_factory=dict)  # name -> containment


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
