"""The library's layering: modules that describe formats, and the data stages, run without
torch; tools around the pipeline (bench, cli) are never imported by the library."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

from gptlab.imports import imported_modules

# Formats (params, token files, the training log, atomic output, downstream task data) and what
# the download, clean, tokenize and plot stages run: none needs a deep-learning framework to start.
WITHOUT_TORCH = ["gptlab.params", "gptlab.io", "gptlab.errors", "gptlab.trainlog",
                 "gptlab.tokens", "gptlab.plots", "gptlab.clean", "gptlab.encode",
                 "gptlab.tokenizers", "gptlab.sources", "gptlab.sources.hf", "gptlab.tasks"]
PACKAGE = ROOT / "src" / "gptlab"
# Every module of the bench, and the command line.
TOOLS = {"gptlab.cli", "gptlab.bench", *(f"gptlab.bench.{source.stem}"
                                         for source in (PACKAGE / "bench").glob("*.py"))}


@pytest.mark.parametrize("module", WITHOUT_TORCH)
def test_module_imports_no_torch(module):
    check = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} imports torch{result.stderr}"


def test_the_library_never_imports_its_tools():
    importers = {}
    for source in PACKAGE.rglob("*.py"):
        relative = source.relative_to(PACKAGE)
        if relative.parts[0] == "bench" or relative.name == "cli.py":
            continue
        if found := imported_modules(source) & TOOLS:
            importers[relative.as_posix()] = found
    assert importers == {}


def test_imported_modules_sees_every_form_of_import(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import gptlab.params\nfrom gptlab.io import write_json\n"
                      "from gptlab import trainlog, __version__\n"
                      "def later():\n    import gptlab.cli\n")
    # `from gptlab import ...` runs the package itself: gptlab/__init__.py.
    assert imported_modules(source) == {"gptlab.params", "gptlab.io", "gptlab", "gptlab.trainlog",
                                        "gptlab.cli"}
