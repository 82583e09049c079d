"""The local source: a file (an archive is unpacked), a folder, or a glob on this machine."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import sha256_file
from gptlab.params import DataParams
from gptlab.sources.archives import matches_include, place_artifact
from gptlab.sources.cache import Artifact


def place_local(data: DataParams, dest: Path) -> Artifact | None:
    """Copy (or unpack) the local file, folder or glob named by `data.spec` into `dest`."""
    spec = os.path.expanduser(data.spec)
    if os.path.isfile(spec):
        source = Path(spec)
        digest = sha256_file(source)
        if data.sha256 is not None and digest != data.sha256:
            raise GptlabError(f"data.sha256: {spec} has sha256 {digest}, expected {data.sha256}")
        place_artifact(source, dest, data.include)
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
