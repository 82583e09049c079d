"""The documentation site builds strictly: a broken link or anchor, or a page left out of the
nav, is a warning that fails `mkdocs build --strict` (`make docs`) and this test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def build_site(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(project / "mkdocs.yml"),
         "-d", str(site)], capture_output=True, text=True)


def test_the_site_builds_strictly_without_a_warning(tmp_path):
    built = build_site(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def docs_copy(folder: Path) -> Path:
    """The site's sources in `folder`, with the committed figures the docs' links point to."""
    for name in ("docs", "plots"):
        shutil.copytree(ROOT / name, folder / name, symlinks=True)
    shutil.copy(ROOT / "mkdocs.yml", folder)
    return folder


def test_a_broken_link_a_broken_anchor_and_a_page_outside_the_nav_each_fail_the_build(tmp_path):
    project = docs_copy(tmp_path / "project")
    with (project / "docs" / "pipeline.md").open("a") as page:
        page.write("\n[the stages](no-such-page.md), [train](#no-such-section)\n")
    (project / "docs" / "left-out.md").write_text("# A page the nav does not list\n")
    built = build_site(project, tmp_path / "site")
    assert built.returncode != 0
    for named in ("no-such-page.md", "#no-such-section", "left-out.md"):
        assert named in built.stderr, built.stderr
