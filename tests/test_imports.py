"""gptlab.imports: the gptlab files a Python file runs, found from its import statements."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT

from gptlab.imports import gptlab_imports, imported_modules, module_file


def make_package(root: Path, files: dict[str, str]) -> Path:
    """A gptlab package of the given files (path in the package -> source) under `root`."""
    package = root / "gptlab"
    for name, source in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    return package


def relative(found: set[Path], package: Path) -> set[str]:
    return {path.relative_to(package).as_posix() for path in found}


def test_a_package_is_followed_through_its_init_and_its_submodules(tmp_path):
    package = make_package(tmp_path, {
        "clean/__init__.py": "from gptlab.clean.rules import rule\n",
        "clean/rules.py": "from gptlab.errors import GptlabError\nrule = 1\n",
        "errors.py": "class GptlabError(Exception): ...\n",
        "unrelated.py": "",
    })
    stage = tmp_path / "stage.py"
    stage.write_text("from gptlab.clean import rule\n")
    assert relative(gptlab_imports(stage, package), package) == {
        "__init__.py", "clean/__init__.py", "clean/rules.py", "errors.py"}
    # A submodule imported by its full name runs the packages that hold it too.
    stage.write_text("from gptlab.clean.rules import rule\n")
    assert relative(gptlab_imports(stage, package), package) == {
        "__init__.py", "clean/__init__.py", "clean/rules.py", "errors.py"}


@pytest.mark.parametrize(("source", "expected"), [
    ("from . import rules\n", {"gptlab.clean", "gptlab.clean.rules"}),
    ("from .rules import rule\n", {"gptlab.clean.rules"}),
    ("from .. import io\n", {"gptlab", "gptlab.io"}),
    ("from ..io import write_text\n", {"gptlab.io"}),
])
def test_relative_imports_resolve_against_the_files_package(tmp_path, source, expected):
    package = make_package(tmp_path, {"clean/__init__.py": "", "clean/rules.py": "rule = 1\n",
                                      "io.py": "", "clean/split.py": source})
    assert imported_modules(package / "clean" / "split.py", package) == expected


def test_relative_imports_in_an_init_resolve_against_its_own_package(tmp_path):
    package = make_package(tmp_path, {"clean/__init__.py": "from .rules import rule\n",
                                      "clean/rules.py": "rule = 1\n"})
    assert imported_modules(package / "clean" / "__init__.py", package) == {"gptlab.clean.rules"}


def test_a_relative_import_outside_the_package_is_not_gptlabs(tmp_path):
    package = make_package(tmp_path, {"io.py": ""})
    script = tmp_path / "script.py"
    script.write_text("from . import io\nfrom .io import x\n")
    assert imported_modules(script, package) == set()


def test_a_package_wins_over_a_module_file_of_the_same_name(tmp_path):
    package = make_package(tmp_path, {"clean.py": "", "clean/__init__.py": ""})
    assert module_file("gptlab.clean", package) == package / "clean" / "__init__.py"
    assert module_file("gptlab", package) == package / "__init__.py"


def test_other_packages_and_missing_names_are_left_out(tmp_path):
    package = make_package(tmp_path, {"io.py": ""})
    script = tmp_path / "script.py"
    script.write_text("import os\nimport numpy.linalg\nfrom gptlab.io import write_text\n"
                      "from gptlab.nowhere import x\nimport gptlabs\n")
    assert imported_modules(script, package) == {"gptlab.io"}


def test_no_stage_and_no_library_module_but_the_command_line_runs_the_lab():
    """The lab (gptlab.lab) answers questions about experiments: editing it reruns no stage and
    keeps every training run resumable."""
    package = ROOT / "src" / "gptlab"
    lab = package / "lab"
    importers = [source for source in [*(ROOT / "stages").glob("*.py"), *package.rglob("*.py")]
                 if not source.is_relative_to(lab) and source.name != "cli.py"
                 and any(path.is_relative_to(lab) for path in gptlab_imports(source))]
    assert importers == []
