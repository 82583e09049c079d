"""Atomic file output, hashing and the process's peak memory: the one place where gptlab writes
results to disk.

Every output is written to a temporary name in its destination folder and renamed into place
only when complete, so a killed stage never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

HASH_CHUNK_BYTES = 1 << 20
# gptlab's own caches (verified downloads, resume checkpoints), outside git and DVC's outputs.
CACHE_DIR = Path(".gptlab")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes owner-only files; outputs should get the usual permissions.
    tmp.chmod(0o666 & ~_current_umask())
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; swap it in for `path` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_current_umask())
    try:
        yield tmp
        if final.exists():
            # Move the old folder aside first: a rename cannot replace a non-empty folder.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_text(path: str | os.PathLike, missing: str) -> str:
    """A UTF-8 file's text; a missing or unreadable file is a GptlabError naming it, and
    `missing` says what to do when it does not exist."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found ({missing})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise GptlabError(f"{path}: cannot be read: {error}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, indented and with a trailing newline so diffs stay readable."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_leftovers(final: Path) -> None:
    """Delete the temporary copies of `final` that a killed run (SIGKILL skips every cleanup)
    left beside it; only one run writes an output at a time."""
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's VmHWM belongs to the running program alone; getrusage's ru_maxrss survives fork and
    exec, so a child started by a large process would report its parent's peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    scale = 2**20 if platform.system() == "Darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
