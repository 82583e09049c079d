"""Placing a fetched artifact: tar and zip archives unpacked (no member may land outside the
target folder, no link is unpacked), any other file copied as it is; and the `include`
patterns that pick the files to keep."""

from __future__ import annotations

import functools
import shutil
import stat
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.sources.download import COPY_CHUNK_BYTES


def matches_include(member: str, include: list[str]) -> bool:
    """Whether `member` (a relative POSIX path) ends with a path matching one pattern."""
    path = PurePosixPath(member)
    return any(path.match(pattern) for pattern in include)


def place_artifact(artifact: Path, dest: Path, include: list[str]) -> bool:
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
