"""The hf source: a Hugging Face dataset's parquet shards, streamed into JSON-lines documents.

huggingface_hub talks to the Hub, as it does for GPT-2's weights (gptlab.pretrained), so the
source follows its conventions: HF_ENDPOINT names a mirror, the token is HF_TOKEN or the one
`hf auth login` saved (sent to the Hub, never to the CDN that the Hub sends downloads on to),
HF_HUB_OFFLINE forbids the network, and shards are kept in huggingface_hub's shared cache
(HF_HOME, ~/.cache/huggingface by default). gptlab adds what a reproducible corpus needs: the
revision pinned to a commit recorded in the manifest, every shard checked against the sha256 the
Hub lists for it, caps that stop before the shards they would not use, and one-line errors that
name the param at fault.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import DiskFull, atomic_path, disk_full, sha256_file
from gptlab.params import SHA256_PATTERN, DataParams
from gptlab.sources import describe_files
from gptlab.sources.archives import matches_include
from gptlab.sources.cache import ChecksumMismatch
from gptlab.sources.download import URL_ATTEMPTS, Fault, retryable_status, retrying

COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
# Rows per parquet batch: web documents average a few KB, so pyarrow's default of 65,536 rows
# would hold hundreds of MB of text in memory at once.
PARQUET_BATCH_ROWS = 1024
# What the one-line errors suggest when the Hub refuses us.
LOG_IN = "set HF_TOKEN or run `hf auth login`"


@dataclass(frozen=True)
class Shard:
    """A parquet file of the dataset, with the sha256 the Hub lists for it."""

    path: str
    sha256: str


@dataclass
class Tally:
    """Running totals of the documents written so far, checked against the caps.

    Documents are kept whole, so the one that reaches max_bytes is written and text_bytes
    may pass the cap by less than one document.
    """

    max_documents: int | None
    max_bytes: int | None
    documents: int = 0
    text_bytes: int = 0
    skipped_null: int = 0
    capped: bool = False

    def full(self) -> bool:
        return ((self.max_documents is not None and self.documents >= self.max_documents)
                or (self.max_bytes is not None and self.text_bytes >= self.max_bytes))


def fetch_hf(data: DataParams, dest: Path) -> dict:
    """Stream the parquet shards of dataset `data.spec` into `dest` as JSON lines.

    The revision is resolved to a commit first, so every shard comes from the same snapshot
    and the manifest pins it. Shards are fetched one at a time, in path order, and the caps
    are checked before each one, so a capped run never downloads the shards it would not use.
    The shards are kept in huggingface_hub's cache, which every tool of the Hub's shares.
    """
    api = HfApi()  # the endpoint and token huggingface_hub is configured with
    name, hf = data.spec, data.hf
    commit = resolve_revision(api, name, hf.revision)
    shards = list_shards(api, name, commit, data.include)
    tally = Tally(hf.max_documents, hf.max_bytes)
    used = []
    with tqdm(total=hf.max_documents, desc=name, unit="doc", disable=None,
              file=sys.stderr) as progress:
        for shard in shards:
            if tally.full():
                tally.capped = True
                break
            local = download_shard(api, name, commit, shard)
            target = dest / PurePosixPath(shard.path).with_suffix(".jsonl")
            write_documents(local, shard.path, target, hf.text_column, tally, progress.update)
            used.append({"path": shard.path, "sha256": shard.sha256})
    if tally.documents == 0:
        raise GptlabError(f"data.hf.text_column: no text in column {hf.text_column!r} of "
                          f"{len(used)} shard(s) ({tally.skipped_null} null or non-string "
                          f"values)")
    return {
        "source": data.source,
        "spec": name,
        "revision": hf.revision,
        "commit": commit,
        "include": list(data.include),
        "shards": used,
        "documents": tally.documents,
        "text_bytes": tally.text_bytes,
        "capped": tally.capped,
        "skipped_null": tally.skipped_null,
        **describe_files(dest),
    }


def resolve_revision(api: HfApi, name: str, revision: str) -> str:
    """The commit that branch, tag or commit `revision` of dataset `name` points at now."""
    try:
        # The sha alone: the whole answer lists every file, thousands in a large dataset.
        commit = api.dataset_info(name, revision=revision, expand=["sha"]).sha
    except Exception as error:  # HTTP, network, offline...: hub_error says which in a line
        raise hub_error(error, api.endpoint, name, revision,
                        f"looking up {name}@{revision}") from None
    if not isinstance(commit, str) or not COMMIT_PATTERN.match(commit):
        raise GptlabError(f"HF_ENDPOINT: {api.endpoint} gave no commit sha for {name}@"
                          f"{revision}; is it a Hugging Face Hub?")
    return commit


def list_shards(api: HfApi, name: str, commit: str, include: list[str]) -> list[Shard]:
    """The parquet files of `name` at `commit` that match `include`, in path order."""
    try:
        # Not expand=True: the LFS sha256s come without it, 1,000 files a page instead of 50.
        entries = list(api.list_repo_tree(name, repo_type="dataset", revision=commit,
                                          recursive=True))
    except Exception as error:
        raise hub_error(error, api.endpoint, name, commit,
                        f"listing the files of {name}@{commit}") from None
    parquet = sorted((e for e in entries if isinstance(e, RepoFile)
                      and e.path.endswith(".parquet")), key=lambda e: e.path)
    kept = [_shard(e) for e in parquet if matches_include(e.path, include)]
    if not kept:
        found = ", ".join(e.path for e in parquet[:5]) or "none"
        more = f", ... ({len(parquet)} in all)" if len(parquet) > 5 else ""
        raise GptlabError(f"data.include: no parquet file of {name}@{commit} matches "
                          f"{list(include)} (found: {found}{more})")
    return kept


def _shard(entry: RepoFile) -> Shard:
    """A listed parquet file, refused if its path or sha256 could not be used safely."""
    parts = PurePosixPath(entry.path).parts
    if PurePosixPath(entry.path).is_absolute() or ".." in parts:
        raise GptlabError(f"{entry.path}: the Hub listed a path outside the dataset; refusing it")
    sha256 = entry.lfs.sha256 if entry.lfs else None
    if not isinstance(sha256, str) or not SHA256_PATTERN.match(sha256):
        # Only files stored with Git LFS come with a sha256 to check the download against.
        raise GptlabError(f"{entry.path}: the Hub lists no sha256 for it (not an LFS file), so "
                          f"it cannot be verified")
    return Shard(entry.path, sha256)


def download_shard(api: HfApi, name: str, commit: str, shard: Shard) -> Path:
    """The shard in huggingface_hub's cache, fetched from the commit (not the branch) unless
    cached already, and checked against the sha256 the Hub lists for it."""
    def fetch() -> str:
        return hf_hub_download(name, shard.path, repo_type="dataset", revision=commit,
                               endpoint=api.endpoint, token=api.token)

    try:
        # A retry resumes from the part huggingface_hub keeps in its cache.
        local = Path(retrying(fetch, f"download of {shard.path} of {name}", URL_ATTEMPTS,
                              transient=hub_fault))
    except GptlabError:
        raise
    except Exception as error:
        if disk_full(error):
            raise DiskFull(Path(constants.HF_HUB_CACHE), f"{shard.path} of {name}") from None
        raise hub_error(error, api.endpoint, name, commit,
                        f"downloading {shard.path} of {name}@{commit}") from None
    check_shard(local, shard)
    return local


def check_shard(local: Path, shard: Shard) -> None:
    """Refuse a shard whose bytes are not the ones the Hub lists, and drop it from the cache.

    Checked on every run, cached or not: huggingface_hub compares sizes only, and other tools
    write to its cache too. A refused file is dropped so that the next run downloads it
    again, rather than refusing the same bytes for ever.
    """
    digest = sha256_file(local)
    if digest == shard.sha256:
        return
    blob = local.resolve()  # the snapshot's file links to the blob that holds the bytes
    local.unlink()
    blob.unlink(missing_ok=True)
    raise ChecksumMismatch(f"{shard.path}: the Hub lists sha256 {shard.sha256} for it but "
                           f"served a file with sha256 {digest}; refusing it", digest)


def hub_fault(error: Exception) -> Fault | None:
    """An answer of the Hub or its CDN that a retry may change. huggingface_hub retries a
    download's 408 and 429 itself, not a 5xx such as a 503 with Retry-After."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if retryable_status(status):
            return Fault(_answer(error), error.response.headers.get("Retry-After"))
    return None


def hub_error(error: Exception, endpoint: str, name: str, revision: str,
              doing: str) -> GptlabError:
    """One line for what huggingface_hub raised while `doing` something with dataset `name`
    at `revision`, naming the param at fault."""
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        # hf_hub_download says a file is not cached when the Hub could not be asked: say why
        return hub_error(error.__cause__, endpoint, name, revision, doing)
    if isinstance(error, RevisionNotFoundError):
        return GptlabError(f"data.hf.revision: dataset {name} has no branch, tag or commit "
                           f"{revision!r} ({_answer(error)})")
    if isinstance(error, GatedRepoError):
        return GptlabError(f"data.spec: dataset {name} is gated ({_answer(error)}): accept its "
                           f"terms on the Hub, then {LOG_IN}")
    if isinstance(error, RepositoryNotFoundError):
        if error.response.status_code in (401, 403):
            # The Hub answers 401 for a missing dataset too, so as not to reveal private ones.
            return GptlabError(f"data.spec: no dataset {name} at {endpoint} that we may read "
                               f"({_answer(error)}); for a private or gated dataset {LOG_IN}")
        return GptlabError(f"data.spec: no dataset {name} at {endpoint} ({_answer(error)})")
    if isinstance(error, HfHubHTTPError):
        if error.response.status_code in (401, 403):
            return GptlabError(f"data.spec: {doing} was refused ({_answer(error)}); for a "
                               f"private or gated dataset (accept its terms on the Hub first) "
                               f"{LOG_IN}")
        return GptlabError(f"data.spec: {doing} gave {_answer(error)}")
    if isinstance(error, OfflineModeIsEnabled):
        # The file list and its sha256s are asked of the Hub on every run: nothing is cached
        # to check the shards against.
        return GptlabError(f"HF_HUB_OFFLINE: it is set, but {doing} needs the Hub")
    if isinstance(error, json.JSONDecodeError):
        return GptlabError(f"HF_ENDPOINT: {doing} got an answer that is not JSON; is "
                           f"{endpoint} a Hugging Face Hub?")
    # Network failures (after huggingface_hub's retries), a malformed dataset name...
    return GptlabError(f"data.spec: {doing} failed ({type(error).__name__}: "
                       f"{_first_line(error)})")


def _answer(error: HfHubHTTPError) -> str:
    """The Hub's answer in a few words: the HTTP status, and the reason it gave if any."""
    response = error.response
    answer = f"HTTP {response.status_code} {response.reason_phrase}"
    return f"{answer}: {_first_line(error.server_message)}" if error.server_message else answer


def _first_line(message: object) -> str:
    return str(message).strip().split("\n", 1)[0]


def write_documents(parquet: Path, shard: str, target: Path, column: str, tally: Tally,
                    advance: Callable[[int], object]) -> None:
    """Write each document of `column` to `target` as a JSON line until `tally` is full: a
    text as {"text": ...}, a conversation (a list of {"role", "content"}, as chat datasets
    store their `messages`) as {"messages": [...]}, which clean reads as a conversation.

    Nulls (and any other value) are skipped and counted. The file appears only once
    complete, so a failure halfway through a shard leaves no half-written shard behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for value in column_values(parquet, shard, column):
            if tally.full():
                tally.capped = True
                return
            record = document_record(value)
            if record is None:
                tally.skipped_null += 1
                continue
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            tally.documents += 1
            tally.text_bytes += sum(len(text.encode("utf-8")) for text in record_texts(record))
            advance(1)


def document_record(value: object) -> dict[str, object] | None:
    """The JSON line of one value of the text column: a text, a conversation, or None."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, list) and value and all(
            isinstance(turn, dict) and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str) for turn in value):
        return {"messages": [{"role": turn["role"], "content": turn["content"]}
                             for turn in value]}
    return None


def record_texts(record: dict[str, object]) -> list[str]:
    """The texts a JSON line holds, as data.hf.max_bytes counts them."""
    if "text" in record:
        return [record["text"]]
    return [turn["content"] for turn in record["messages"]]


def column_values(parquet: Path, shard: str, column: str) -> Iterator[object]:
    """The values of one column of a parquet file, a batch of rows at a time."""
    try:
        parquet_file = pq.ParquetFile(parquet)
        columns = parquet_file.schema_arrow.names
        if column not in columns:
            raise GptlabError(f"data.hf.text_column: no column {column!r} in {shard} "
                              f"(columns: {', '.join(columns)})")
        for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            yield from batch.column(0).to_pylist()
    except pa.ArrowException as error:
        raise GptlabError(f"{shard}: not a parquet file ({error})") from None
