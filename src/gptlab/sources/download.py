"""The url source: downloads that resume with a Range request, and retries of what a retry
may change."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from http.client import HTTPException, HTTPResponse
from pathlib import Path, PurePosixPath
from typing import TypeVar

from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import disk_full, disk_full_named
from gptlab.sources.cache import Artifact, cached, store_verified

URL_TIMEOUT_SECONDS = 30.0
URL_ATTEMPTS = 4
COPY_CHUNK_BYTES = 1 << 20
# 4xx answers other than these will not change on a retry.
RETRYABLE_HTTP_CODES = {408, 425, 429}
# The longest wait a server's Retry-After gets, and the pause between other attempts (times
# the attempt's number).
RETRY_AFTER_LIMIT_SECONDS = 60.0
BACKOFF_SECONDS = 0.5
T = TypeVar("T")


def fetch_url(url: str, sha256: str, cache: Path,
              timeout: float = URL_TIMEOUT_SECONDS, attempts: int = URL_ATTEMPTS) -> Artifact:
    """Stream `url` into the cache with resume and retries, verified against `sha256`."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise GptlabError(f"data.spec: {url!r} is not an http(s) URL")
    hit = cached(cache, sha256)
    if hit:
        return Artifact(hit, sha256)
    partial = cache / f"{sha256}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)

    def download() -> None:
        try:
            _download_once(url, partial, timeout)
        except urllib.error.HTTPError as error:
            if error.code != 416 or not partial.exists():
                raise
            # 416: killed after the last byte, so the partial file is whole; the hash decides

    try:
        with disk_full_named(partial, f"the download of {url}"):
            retrying(download, f"download of {url}", attempts)
    except urllib.error.HTTPError as error:
        raise GptlabError(f"data.spec: HTTP {error.code} {error.reason} from {url}") from None
    named = partial.with_name(_url_file_name(url))
    os.replace(partial, named)
    try:
        return store_verified(named, sha256, cache)
    finally:
        named.unlink(missing_ok=True)


@dataclass(frozen=True)
class Fault:
    """A failure that a retry may change: what went wrong, and the server's Retry-After."""

    problem: str
    retry_after: str | None = None


def retryable_status(code: int) -> bool:
    """Whether an HTTP answer with this status may change on a retry."""
    return code >= 500 or code in RETRYABLE_HTTP_CODES


def url_fault(error: Exception) -> Fault | None:
    """The retryable fault in what urllib raised, or None."""
    if isinstance(error, urllib.error.HTTPError):
        if not retryable_status(error.code):
            return None
        return Fault(f"HTTP {error.code} {error.reason}", error.headers.get("Retry-After"))
    if isinstance(error, (urllib.error.URLError, HTTPException, OSError)) and not disk_full(error):
        # A dropped connection or one that stalled past the timeout; no retry makes disk room
        return Fault(str(getattr(error, "reason", error)) or type(error).__name__)
    return None


def retrying(request: Callable[[], T], what: str, attempts: int,
             transient: Callable[[Exception], Fault | None] = url_fault) -> T:
    """request() until it succeeds, retrying what a retry may change up to `attempts` times,
    after the wait a Retry-After asks for or a backoff that grows with each attempt. Any other
    error is raised as it is: only the caller knows which param it points at.

    `transient` says whether an error is worth retrying; url_fault (5xx, 408/425/429, a dropped
    or stalled connection) by default.
    """
    for attempt in range(1, attempts + 1):
        try:
            return request()
        except Exception as error:
            if (fault := transient(error)) is None:
                raise
        if attempt < attempts:
            wait = retry_after(fault.retry_after, BACKOFF_SECONDS * attempt)
            print(f"{what} interrupted ({fault.problem}); retrying in {wait:.1f} s",
                  file=sys.stderr)
            time.sleep(wait)
    raise GptlabError(f"data.spec: {what} failed after {attempts} attempts: {fault.problem}")


def retry_after(header: str | None, default: float) -> float:
    """The seconds a 429 or 503 answer's Retry-After asks for (a number or an HTTP date), at
    most RETRY_AFTER_LIMIT_SECONDS; `default` without one."""
    if not header:
        return default
    try:
        seconds = float(header)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(header) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), RETRY_AFTER_LIMIT_SECONDS)


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


def _read_chunks(stream: HTTPResponse) -> Iterator[bytes]:
    # read1 hands over what has arrived, where read would wait for a whole chunk: what came
    # before a connection stalled is on disk, and a retry resumes after it.
    while chunk := stream.read1(COPY_CHUNK_BYTES):
        yield chunk


def _url_file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name if name and name not in (".", "..") else "download"
