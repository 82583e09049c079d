"""Where raw text comes from: a pip package, a URL, local files, or a Hugging Face dataset.

Every downloaded artifact is checked against a pinned sha256 (for a Hugging Face dataset, the
sha256 the Hub lists for each parquet shard at a resolved commit). pip and url artifacts are
kept in a download cache keyed by that hash (the folder the caller names; the download stage's
is `.gptlab/downloads/`), so a rerun never fetches the same bytes twice and a killed download
resumes where it stopped; Hugging Face shards are kept in huggingface_hub's own cache.

One module per source kind (`pip`, `download` for url, `local`, `hf`), with what they share in
`cache` (the sha256-keyed download cache), `download` (HTTP with retries and resume) and
`archives` (unpacking, include patterns).
"""

from __future__ import annotations

from pathlib import Path

from gptlab.io import sha256_file
from gptlab.params import DataParams
from gptlab.sources.archives import place_artifact
from gptlab.sources.download import fetch_url
from gptlab.sources.local import place_local
from gptlab.sources.pip import fetch_pip


def fetch(data: DataParams, dest: Path, cache: Path) -> dict:
    """Fetch the source named by `data` into the empty folder `dest`; return its manifest."""
    if data.source == "hf":
        from gptlab.sources.hf import fetch_hf  # pyarrow is slow to import; only hf needs it

        return fetch_hf(data, dest)
    if data.source == "local":
        artifact = place_local(data, dest)
    else:
        assert data.sha256 is not None  # the params loader requires it for pip and url
        if data.source == "pip":
            artifact = fetch_pip(data.spec, data.sha256, cache)
        else:
            artifact = fetch_url(data.spec, data.sha256, cache)
        place_artifact(artifact.path, dest, data.include)
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
