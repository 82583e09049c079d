"""The hf source: a Hugging Face dataset's parquet shards, streamed into JSON-lines documents."""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path
from gptlab.params import SHA256_PATTERN, DataParams
from gptlab.sources import describe_files
from gptlab.sources.archives import matches_include
from gptlab.sources.cache import ChecksumMismatch
from gptlab.sources.download import (
    URL_ATTEMPTS,
    URL_TIMEOUT_SECONDS,
    DownloadRefused,
    build_request,
    fetch_url,
    retrying,
)

# The Hub's own address; HF_ENDPOINT (the variable huggingface_hub reads) points at a mirror.
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
# Rows per parquet batch: web documents average a few KB, so pyarrow's default of 65,536 rows
# would hold hundreds of MB of text in memory at once.
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Hub:
    """Where the Hugging Face Hub answers, and the headers that authenticate us to it."""

    endpoint: str
    auth: dict[str, str]


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


def fetch_hf(data: DataParams, dest: Path, cache: Path) -> dict:
    """Stream the parquet shards of dataset `data.spec` into `dest` as JSON lines.

    The revision is resolved to a commit first, so every shard comes from the same snapshot
    and the manifest pins it. Shards are fetched one at a time, in path order, and the caps
    are checked before each one, so a capped run never downloads the shards it would not use.
    """
    hub = hub_from_env()
    name, hf = data.spec, data.hf
    commit = resolve_revision(hub, name, hf.revision)
    shards = list_shards(hub, name, commit, data.include)
    tally = Tally(hf.max_documents, hf.max_bytes)
    used = []
    with tqdm(total=hf.max_documents, desc=name, unit="doc", disable=None,
              file=sys.stderr) as progress:
        for shard in shards:
            if tally.full():
                tally.capped = True
                break
            local = _download_shard(hub, name, commit, shard, cache)
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


def hub_from_env() -> Hub:
    """The Hub named by HF_ENDPOINT and HF_TOKEN, the variables huggingface_hub reads too."""
    endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    if urllib.parse.urlparse(endpoint).scheme not in ("http", "https"):
        raise GptlabError(f"HF_ENDPOINT: {endpoint!r} is not an http(s) URL")
    token = os.environ.get("HF_TOKEN")
    return Hub(endpoint, {"Authorization": f"Bearer {token}"} if token else {})


def resolve_revision(hub: Hub, name: str, revision: str) -> str:
    """The commit that branch, tag or commit `revision` of dataset `name` points at now."""
    url = (f"{hub.endpoint}/api/datasets/{urllib.parse.quote(name, safe='/')}/revision/"
           f"{urllib.parse.quote(revision, safe='')}")
    try:
        info, _ = _hub_json(url, hub)
    except urllib.error.HTTPError as error:
        raise _revision_error(error, name, revision, hub.endpoint) from None
    commit = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(commit, str) or not COMMIT_PATTERN.match(commit):
        raise GptlabError(f"HF_ENDPOINT: {url} gave no commit sha; is {hub.endpoint} a "
                          f"Hugging Face Hub?")
    return commit


def _revision_error(error: urllib.error.HTTPError, name: str, revision: str,
                    endpoint: str) -> GptlabError:
    """Say which param is wrong: the Hub tells a missing revision by its X-Error-Code header."""
    answer = f"HTTP {error.code} {error.reason}"
    if error.headers.get("X-Error-Code") == "RevisionNotFound":
        return GptlabError(f"data.hf.revision: dataset {name} has no branch, tag or commit "
                           f"{revision!r} ({answer})")
    if error.code in (401, 403):
        # The Hub answers 401 for a missing dataset too, so as not to reveal private ones.
        return GptlabError(f"data.spec: no dataset {name} at {endpoint} that we may read "
                           f"({answer}); for a private or gated dataset set HF_TOKEN")
    if error.code == 404:
        return GptlabError(f"data.spec: no dataset {name} at {endpoint} ({answer})")
    return GptlabError(f"data.spec: looking up {name}@{revision} at {endpoint} gave {answer}")


def list_shards(hub: Hub, name: str, commit: str, include: list[str]) -> list[Shard]:
    """The parquet files of `name` at `commit` that match `include`, in path order."""
    url: str | None = (f"{hub.endpoint}/api/datasets/{urllib.parse.quote(name, safe='/')}/tree/"
                       f"{commit}?recursive=true")
    entries: list[Any] = []
    while url:  # the Hub pages long listings, naming the next page in a Link header
        try:
            page, url = _hub_json(url, hub)
        except urllib.error.HTTPError as error:
            raise GptlabError(f"data.spec: listing the files of {name}@{commit} gave HTTP "
                              f"{error.code} {error.reason}") from None
        if not isinstance(page, list):
            raise GptlabError(f"HF_ENDPOINT: the file listing of {name} is not a JSON list")
        entries.extend(page)
    parquet = sorted((e for e in entries if isinstance(e, dict) and e.get("type") == "file"
                      and str(e.get("path", "")).endswith(".parquet")), key=lambda e: e["path"])
    kept = [_shard(e) for e in parquet if matches_include(e["path"], include)]
    if not kept:
        found = ", ".join(e["path"] for e in parquet[:5]) or "none"
        more = f", ... ({len(parquet)} in all)" if len(parquet) > 5 else ""
        raise GptlabError(f"data.include: no parquet file of {name}@{commit} matches "
                          f"{list(include)} (found: {found}{more})")
    return kept


def _shard(entry: dict) -> Shard:
    """A listed parquet file, refused if its path or sha256 could not be used safely."""
    path, lfs = entry["path"], entry.get("lfs") or {}
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute() or ".." in parts:
        raise GptlabError(f"{path}: the Hub listed a path outside the dataset; refusing it")
    sha256 = lfs.get("oid")
    if not isinstance(sha256, str) or not SHA256_PATTERN.match(sha256):
        # Only files stored with Git LFS come with a sha256 to check the download against.
        raise GptlabError(f"{path}: the Hub lists no sha256 for it (not an LFS file), so it "
                          f"cannot be verified")
    return Shard(path, sha256)


def _hub_json(url: str, hub: Hub) -> tuple[Any, str | None]:
    """GET a Hub API `url`: its JSON and the next page's URL, retrying what may pass.

    An HTTP error that a retry will not change is raised as it is: only the caller knows
    which param a 404 points at.
    """
    def get() -> tuple[bytes, str | None]:
        with urllib.request.urlopen(build_request(url, hub.auth),
                                    timeout=URL_TIMEOUT_SECONDS) as response:
            return response.read(), response.headers.get("Link")

    body, link = retrying(get, f"Hub request {url}", URL_ATTEMPTS)
    try:
        return json.loads(body), _next_page(link, url, hub.endpoint)
    except ValueError:
        raise GptlabError(f"HF_ENDPOINT: {url} did not answer JSON; is {hub.endpoint} a "
                          f"Hugging Face Hub?") from None


def _next_page(link: str | None, url: str, endpoint: str) -> str | None:
    """The rel="next" URL of a Link header, kept on `endpoint`.

    A mirror may pass on the Hub's own links; like huggingface_hub, follow them on the mirror.
    """
    match = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', link or "")
    if not match:
        return None
    page = urllib.parse.urljoin(url, match.group(1))
    if endpoint != HF_DEFAULT_ENDPOINT and page.startswith(HF_DEFAULT_ENDPOINT + "/"):
        page = endpoint + page.removeprefix(HF_DEFAULT_ENDPOINT)
    return page


def _download_shard(hub: Hub, name: str, commit: str, shard: Shard, cache: Path) -> Path:
    """The verified shard in the download cache, fetched from the commit (not the branch)."""
    url = (f"{hub.endpoint}/datasets/{urllib.parse.quote(name, safe='/')}/resolve/{commit}/"
           f"{urllib.parse.quote(shard.path, safe='/')}")
    try:
        return fetch_url(url, shard.sha256, cache, headers=hub.auth).path
    except ChecksumMismatch as error:
        raise GptlabError(f"{shard.path}: the Hub lists sha256 {shard.sha256} for it but "
                          f"served a file with sha256 {error.digest}; refusing it") from None
    except DownloadRefused as error:
        if error.code in (401, 403):  # a gated dataset lists its files but refuses them
            raise GptlabError(f"{error}; for a private or gated dataset (accept its terms on "
                              f"the Hub first) set HF_TOKEN") from None
        raise


def write_documents(parquet: Path, shard: str, target: Path, column: str, tally: Tally,
                    advance: Callable[[int], object]) -> None:
    """Write each text of `column` to `target` as a {"text": ...} line until `tally` is full.

    Nulls (and any other non-string) are skipped and counted. The file appears only once
    complete, so a failure halfway through a shard leaves no half-written shard behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for value in column_values(parquet, shard, column):
            if tally.full():
                tally.capped = True
                return
            if not isinstance(value, str):
                tally.skipped_null += 1
                continue
            out.write(json.dumps({"text": value}, ensure_ascii=False) + "\n")
            tally.documents += 1
            tally.text_bytes += len(value.encode("utf-8"))
            advance(1)


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
