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

This module runs the two passes and reports what they did; one module per step: `documents`
(reading the raw folder), `normalization`, `dedupe`, `split` (the split and pass 2's writing)
and `leak` (the leak check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptlab.clean.dedupe import (
    NEAR_SHINGLE_WORDS,
    Cluster,
    drop_exact_duplicates,
    drop_near_duplicates,
    exact_key,
    fold_words,
    shingle_hashes,
)
from gptlab.clean.documents import Document, Facts, contents, open_text, read_documents, read_jsonl
from gptlab.clean.leak import LEAK_SHINGLE_WORDS, leak_fraction
from gptlab.clean.normalization import cleaned
from gptlab.clean.split import joined_chars, split_documents, tail_cut, write_splits
from gptlab.errors import GptlabError
from gptlab.params import CleanParams

__all__ = [
    "LEAK_SHINGLE_WORDS",
    "CleanResult",
    "Document",
    "clean_corpus",
    "drop_near_duplicates",
    "facts_of",
    "fold_words",
    "read_jsonl",
    "split_documents",
    "tail_cut",
]

# Each list of report.json (names, clusters) holds at most this many entries, since a JSON-lines
# corpus can have millions of documents; a cut list's full length is under "truncated".
REPORT_MAX_ITEMS = 1000


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
