"""Sharing results through a DVC remote: push from one repo, pull into a fresh git clone."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import commit, copy_project, dvc, dvc_run, git, ran_stages

from gptlab.errors import GptlabError
from gptlab.published import load_published

# Outputs kept in the DVC cache (pushed to and pulled from the remote), and outputs kept in git.
CACHED = ("data/raw", "data/clean", "data/tokens", "models")
IN_GIT = ("metrics/train.json", "plots/train_log.csv", "samples/samples.md", "plots/loss.png")


def digests(project: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The sha256 of every file under each of `names` (a file or a folder), by relative path."""
    found = {}
    for name in names:
        top = project / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path.relative_to(project))] = digest
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pipeline):
    """A project whose pipeline ran and was pushed to a local-folder remote, and a fresh clone."""
    tmp = tmp_path_factory.mktemp("remote")
    project = copy_project(pipeline[0], tmp)
    remote = tmp / "remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    commit(project, "remote")
    dvc(project, "push")

    clone = tmp / "clone"
    git(tmp, "clone", "-q", str(project), str(clone))
    before_pull = {name: (clone / name).exists() for name in (*CACHED, ".gptlab", "corpus")}
    pull_output = dvc(clone, "pull")
    return project, clone, remote, before_pull, pull_output


def test_the_clone_starts_without_outputs_or_download_cache(shared):
    project, _, remote, before_pull, _ = shared
    assert before_pull == {**dict.fromkeys(CACHED, False), ".gptlab": False, "corpus": True}
    assert any(path.is_file() for path in remote.rglob("*"))
    # .gptlab/ (download cache, resume state) is git-ignored: the clone works without it.
    git(project, "check-ignore", "-q", ".gptlab/anything")


def test_pull_brings_back_every_output_byte_for_byte(shared):
    project, clone, _, _, _ = shared
    for name in ("data/tokens/train_000000.bin", "models/model.safetensors", "plots/train_log.csv"):
        assert (clone / name).is_file(), name
    original = digests(project, CACHED + IN_GIT)
    assert "models/model.safetensors" in original and "data/tokens/train_000000.bin" in original
    assert digests(clone, CACHED + IN_GIT) == original


def test_the_pulled_clone_is_up_to_date(shared):
    _, clone, _, _, _ = shared
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    assert ran_stages(dvc(clone, "repro")) == set()
    assert not (clone / ".gptlab").exists()


def test_a_clone_with_an_empty_remote_cannot_pull(shared, tmp_path):
    """The pull really reads the remote: the same clone against an empty copy of it fails."""
    project, _, remote, _, _ = shared
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    empty = tmp_path / "empty"
    shutil.copytree(remote, empty)
    for path in empty.rglob("*"):
        if path.is_file():
            path.unlink()
    dvc(clone, "remote", "modify", "--local", "local", "url", str(empty))
    result = dvc_run(clone, "pull")
    assert result.returncode != 0
    assert not (clone / "models/model.safetensors").exists()


# --- a push that fails midway, and a damaged object --------------------------------------------


def object_path(store: Path, path: Path) -> Path:
    """Where a DVC cache or remote folder keeps the file `path`'s contents."""
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    return store / "files" / "md5" / digest[:2] / digest[2:]


def test_a_push_that_failed_midway_completes_on_the_next_and_the_pull_is_identical(
        shared, tmp_path):
    project, _, _, _, _ = shared
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "--local", "-f", "midway", str(remote))
    # Part of the remote refuses writes (the folder of the weights' object cannot be made,
    # as on a full or read-only disk) while the rest takes them.
    blocked = object_path(remote, project / "models" / "model.safetensors").parent
    blocked.parent.mkdir(parents=True)
    blocked.symlink_to(tmp_path / "gone")
    failed = dvc_run(project, "push", "-r", "midway")
    assert failed.returncode != 0 and "failed to upload" in failed.stderr
    assert [p for p in remote.rglob("*") if p.is_file()]  # others went
    blocked.unlink()
    # A push killed at a seeded moment, then the push that completes.
    killed = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-r", "midway"],
                              cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(27).uniform(0.5, 1.5))
    killed.kill()
    killed.wait()
    dvc(project, "push", "-r", "midway")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    dvc(clone, "remote", "add", "--local", "-f", "midway", str(remote))
    dvc(clone, "pull", "-r", "midway")
    assert digests(clone, CACHED + IN_GIT) == digests(project, CACHED + IN_GIT)


def test_a_damaged_object_in_the_remote_is_named_when_the_model_is_loaded(shared, tmp_path):
    project, _, _, _, _ = shared
    remote = tmp_path / "remote"
    shutil.copytree(shared[2], remote)
    weights = object_path(remote, project / "models" / "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc_run(clone, "pull")
    with pytest.raises(GptlabError, match=r"models/model\.safetensors: damaged"):
        load_published(clone / "models")
