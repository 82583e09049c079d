"""Which gptlab source files a Python file runs, read from its import statements.

The run key hashes the training code found this way (gptlab.checkpoint), and dvc.yaml lists it
as each stage's deps (gptlab.pipeline), so that a code change reruns only what it affects. The
files are parsed, never imported: every import counts, wherever it is (inside a function, under
TYPE_CHECKING), since a stage may run any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def gptlab_imports(source: Path, package: Path = PACKAGE_DIR) -> set[Path]:
    """The source files of the gptlab modules a Python file imports, directly or through other
    gptlab modules, and of the packages that hold them (importing `gptlab.sources.hf` runs
    `gptlab/__init__.py` and `gptlab/sources/__init__.py`). `package` is the gptlab folder the
    names resolve in (another checkout's src/gptlab, say)."""
    found: set[Path] = set()
    pending = [source]
    while pending:
        for name in imported_modules(pending.pop(), package):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                path = module_file(".".join(parts[:end]), package)
                if path not in found and path.exists():
                    found.add(path)
                    pending.append(path)
    return found


def imported_modules(source: Path, package: Path = PACKAGE_DIR) -> set[str]:
    """Names of the gptlab modules a file imports: `import gptlab.x`, `from gptlab.x import y`,
    `from gptlab import x`, `from gptlab import __version__` (which runs the package itself),
    and, in a file of the package, relative imports (`from . import x`, `from .x import y`)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute_module(node, source, package)
            if module:
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names
            if name.split(".")[0] == package.name and module_file(name, package).exists()}


def absolute_module(node: ast.ImportFrom, source: Path, package: Path) -> str | None:
    """The module a `from ... import` statement names, its dots resolved against the package
    `source` lies in; None for a relative import outside the package (not gptlab's)."""
    if node.level == 0:
        return node.module
    if not source.resolve().is_relative_to(package.resolve()):
        return None
    # `from . import x` in gptlab/clean/rules.py means gptlab.clean; each further dot goes up one.
    folder = source.resolve().parent.relative_to(package.resolve().parent).parts
    if node.level > len(folder):
        return None
    base = folder[: len(folder) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def module_file(name: str, package: Path = PACKAGE_DIR) -> Path:
    """The source file of gptlab module `name`: a module file, or a package's __init__.py (a
    package wins over a module file of the same name, as in Python's own import)."""
    path = package.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
