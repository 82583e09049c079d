"""The newcomer's first minutes: a fresh clone runs the README's two commands as written.

The clone test builds a virtual environment and runs the whole pipeline and test suite, so it
is marked `fresh`, which the test suite leaves out: `make check-fresh` runs it. It clones the
committed HEAD.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    block = re.search(r"```\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block, "README.md has no code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    assert readme_commands() == ["make repro", "make test"]


@pytest.mark.slow
@pytest.mark.fresh
def test_a_fresh_clone_runs_the_readme_commands(tmp_path):
    clone = tmp_path / "gptlab"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # A newcomer's shell: no virtual environment active, this one's python not on PATH.
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    for command in readme_commands():
        result = subprocess.run(command, shell=True, cwd=clone, env={**env, "PATH": path},
                                capture_output=True, text=True, timeout=3000)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    metrics = {p.name for p in (clone / "metrics").iterdir()}
    assert metrics == {"clean.json", "tokenize.json", "train.json", "eval.json", "sample.json",
                       "scaling.json"}  # the committed scaling sweep's summary
