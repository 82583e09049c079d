"""Atomic file output, hashing and the process's peak memory: the one place where gptlab writes
results to disk.

Every output is written to a temporary name in its destination folder, flushed to the disk, and
renamed into place only when complete, so a killed stage never leaves a half-written file
behind. A full disk is one clear error naming what was being written, and leaves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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

from gptlab.errors import GptlabError, refuse_if_inputs_changed

HASH_CHUNK_BYTES = 1 << 20
# Where DVC runs queued and temporary experiments: copies of the project inside it.
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# renameat2(2)'s arguments for an atomic swap of two paths (Linux 3.15 and later).
_LIBC = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


class DiskFull(GptlabError):
    """A write the file system refused for want of space (or of quota)."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path}: no space left on device while writing {what}; free some "
                         f"space and run again")
        self.path = Path(path)


def disk_full(error: BaseException) -> bool:
    """Whether `error` is the file system running out of space, however it was reported."""
    if isinstance(error, DiskFull):
        return True
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    # Libraries written in Rust (safetensors) report the OS error in their message alone.
    return any(f"(os error {code})" in str(error) for code in DISK_FULL_ERRNOS)


@contextlib.contextmanager
def disk_full_named(final: Path, what: str, staging: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into one DiskFull naming `final` and `what`.

    A DiskFull already named keeps its name, unless it names a file of `staging` (the folder
    being built for `final`): the output is the folder, not its temporary parts.
    """
    try:
        yield
    except DiskFull as error:
        if staging is None or not error.path.is_relative_to(staging):
            raise
        raise DiskFull(final, what) from None
    except BaseException as error:
        if not disk_full(error):
            raise
        raise DiskFull(final, what) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "it") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    `what` names the output in the error a full disk gives ("the metrics", say).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes owner-only files; outputs should get the usual permissions.
    tmp.chmod(0o666 & ~_current_umask())
    try:
        with disk_full_named(final, what):
            yield tmp
            _fsync_file(tmp)
            refuse_if_inputs_changed()
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str = "it") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; swap it in for `path` if the block succeeds.

    `what` names the output in the error a full disk gives ("token shards", say).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_current_umask())
    try:
        with disk_full_named(final, what, staging=tmp):
            yield tmp
            _share_files(tmp)
            _fsync_tree(tmp)
            refuse_if_inputs_changed()
            _swap_in(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        return  # the old folder is now at `tmp`, which atomic_dir deletes
    # Move the old folder aside first: a rename cannot replace a non-empty folder.
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(tmp, final)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux's renameat2 with RENAME_EXCHANGE), so that a reader
    of `b` never finds it missing; False where the platform or its file system cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def cache_dir(kind: str) -> Path:
    """gptlab's cache of `kind` (verified downloads, resume checkpoints): `.gptlab/<kind>` in
    the project, outside git and DVC's outputs.

    A queued or temporary DVC experiment runs in a copy of the project under
    `.dvc/tmp/exps/`, which DVC deletes afterwards: it uses the project's own cache instead, so
    it downloads nothing twice, and a killed experiment resumes when it is run again.
    """
    here = Path.cwd().resolve().parts
    for start in range(len(here) - len(EXPERIMENT_COPIES) + 1):
        if here[start : start + len(EXPERIMENT_COPIES)] == EXPERIMENT_COPIES:
            return Path(*here[:start]) / ".gptlab" / kind
    return Path(".gptlab") / kind


def read_text(path: str | os.PathLike, missing: str) -> str:
    """A UTF-8 file's text; a missing or unreadable file is a GptlabError naming it, and
    `missing` says what to do when it does not exist."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found ({missing})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise GptlabError(f"{path}: cannot be read: {error}") from None


def write_text(path: str | os.PathLike, text: str, what: str = "it") -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, what: str = "it") -> None:
    """Write JSON atomically, indented and with a trailing newline so diffs stay readable."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", what)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_leftovers(final: Path) -> None:
    """Delete the temporary copies of `final` that a killed run (SIGKILL skips every cleanup)
    left beside it, and a replaced folder it had not yet deleted; only one run writes an
    output at a time."""
    name = glob.escape(final.name)
    for pattern in (f".{name}.*.tmp", f".{name}.*.old"):
        for leftover in final.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    """Flush a file's data to the disk: a disk that fills up only then reports it here, and a
    crash after the rename cannot leave an empty file under the final name."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _share_files(folder: Path) -> None:
    """Give the files written into `folder` the permissions the umask allows: some writers
    (safetensors) make owner-only files, which a shared DVC cache or remote could not serve."""
    allowed = 0o666 & ~_current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode | allowed)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform can open a folder to flush it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
