"""dvc.yaml's code deps, written from what each stage's script imports (`gptlab stages`).

A stage lists as deps its script, then the gptlab modules the script imports directly or
through other gptlab modules (sorted), then the stage's other deps (requirements.lock, its data)
in their own order. Only those lists are rewritten: comments, order and everything else in
dvc.yaml stay as they are.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from gptlab.errors import GptlabError
from gptlab.imports import gptlab_imports

DVC_YAML = "dvc.yaml"
LAUNCHER = ("sh", "stages/run")
# The layout the lists are found and written in: two spaces per level.
STAGE_KEY = re.compile(r"^  (\S+):\s*$")
DEPS_KEY = re.compile(r"^    deps:\s*$")
DEP_ITEM = re.compile(r"^      - (.*)$")


def stage_script(stage: str, spec: dict[str, Any]) -> str:
    """The script a stage's command runs: `sh stages/run SCRIPT.py PATH ...` runs
    stages/SCRIPT.py."""
    words = str(spec.get("cmd", "")).split()
    if tuple(words[:2]) != LAUNCHER or len(words) < 3 or not words[2].endswith(".py"):
        raise GptlabError(f"{DVC_YAML}: stage {stage}: the command is not "
                          f"`sh stages/run SCRIPT.py PATH ...`")
    return f"stages/{words[2]}"


def stage_deps(root: Path, stage: str, spec: dict[str, Any]) -> list[str]:
    """A stage's deps as they should be: its script, the gptlab modules it runs (paths from
    `root`, sorted), then its deps that are not code, in their order."""
    script = stage_script(stage, spec)
    if not (root / script).is_file():
        raise GptlabError(f"{DVC_YAML}: stage {stage}: {script} not found")
    modules = gptlab_imports(root / script, root / "src" / "gptlab")
    code = sorted(path.relative_to(root).as_posix() for path in modules)
    others = [dep for dep in spec.get("deps") or [] if not str(dep).endswith(".py")]
    return [script, *code, *others]


def with_generated_deps(root: Path, text: str) -> str:
    """dvc.yaml's text (`text`, of the project in `root`) with every stage's deps list as
    stage_deps writes it, and nothing else changed."""
    stages = parse(text).get("stages") or {}
    wanted = {stage: stage_deps(root, stage, spec) for stage, spec in stages.items()}
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    section = stage = None
    index = 0
    while index < len(lines):
        line = lines[index]
        out.append(line)
        index += 1
        if line[:1].strip() and not line.startswith("#"):  # a top-level key
            section, stage = line.rstrip(), None
        elif section == "stages:" and (key := STAGE_KEY.match(line)):
            stage = key[1]
        elif stage in wanted and DEPS_KEY.match(line):
            while index < len(lines) and DEP_ITEM.match(lines[index]):
                index += 1
            out.extend(f"      - {dep}\n" for dep in wanted[stage])
    written = "".join(out)
    check_only_deps_changed(text, written, wanted)
    return written


def check_only_deps_changed(before: str, after: str, wanted: dict[str, list[str]]) -> None:
    """Refuse a rewrite that YAML does not read back as the same file with the wanted deps (a
    layout the line-by-line rewrite does not know: other indentation, a comment in a list)."""
    expected = parse(before)
    for stage, deps in wanted.items():
        expected["stages"][stage]["deps"] = deps
    if parse(after) != expected:
        raise GptlabError(f"{DVC_YAML}: cannot rewrite the stages' deps in place: write each "
                          f"stage's deps as a plain list, two spaces per level")


def parse(text: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise GptlabError(f"{DVC_YAML}: not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise GptlabError(f"{DVC_YAML}: not a mapping of stages")
    return loaded


def changes(before: str, after: str) -> str:
    """A unified diff of dvc.yaml, empty when nothing changes."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True),
                                        f"{DVC_YAML} (now)", f"{DVC_YAML} (generated)"))
