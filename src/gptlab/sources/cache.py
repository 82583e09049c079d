"""The download cache: each verified artifact in a folder named by its sha256."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, sha256_file


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


def cached(cache: Path, sha256: str) -> Path | None:
    """The cached artifact with this hash, if a previous run verified one."""
    folder = cache / sha256
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def store_verified(downloaded: Path, sha256: str, cache: Path,
                   pin: str = "data.sha256") -> Artifact:
    """Check `downloaded` against `sha256` (written at `pin`, which a mismatch names) and move
    it into the cache under that hash."""
    digest = sha256_file(downloaded)
    if digest != sha256:
        raise ChecksumMismatch(f"{pin}: {downloaded.name} has sha256 {digest}, expected "
                               f"{sha256} (a different file than pinned: update {pin} "
                               f"only if you trust it)", digest)
    target = cache / sha256 / downloaded.name
    with atomic_path(target) as tmp:
        shutil.copyfile(downloaded, tmp)
    return Artifact(target, sha256)
