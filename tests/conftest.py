"""Shared fixtures: the project's own params, stage runners, and the shared test corpus."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# A well-known corpus kept beside the checkout for tests and benchmarks (not in git).
TINYSHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A few KB of English verse (Coriolanus, I.i), e.g. enough merges for a 350-token BPE.
VERSE = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?

All:
No more talking on't; let it be done: away, away!

Second Citizen:
One word, good citizens.

First Citizen:
We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us: if they
would yield us but the superfluity, while it were
wholesome, we might guess they relieved us humanely;
but they think we are too dear: the leanness that
afflicts us, the object of our misery, is as an
inventory to particularise their abundance; our
sufferance is a gain to them Let us revenge this with
our pikes, ere we become rakes: for the gods know I
speak this in hunger for bread, not in thirst for revenge.
"""


@pytest.fixture(scope="session")
def default_params() -> dict[str, Any]:
    """The project's params.yaml as a plain dict (copy it before changing it)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with dotted-key overrides applied: {"clean.split": "tail"}."""
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = value
    return params


@pytest.fixture
def params_for(default_params: dict[str, Any]):
    """Build a params dict from the project's defaults with dotted-key overrides."""
    return lambda overrides=None: with_overrides(default_params, overrides or {})


def write_params(folder: Path, params: dict[str, Any]) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(
    script: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a stage script of this checkout in `cwd`, as DVC would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script)],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )


@pytest.fixture
def tinyshakespeare() -> Path:
    if not TINYSHAKESPEARE.exists():
        pytest.skip(f"{TINYSHAKESPEARE} not present")
    return TINYSHAKESPEARE


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refusing stage prints, after checking it failed in exactly that way."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
