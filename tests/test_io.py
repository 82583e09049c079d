"""Atomic output helpers: a failed write leaves the old file or folder untouched and no litter."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from gptlab.io import (
    DiskFull,
    atomic_dir,
    atomic_path,
    cache_dir,
    disk_full,
    disk_full_named,
    sha256_file,
    write_json,
    write_text,
)


def test_atomic_path_renames_into_place_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o077) != "0o0"  # not left owner-only like mkstemp's


def test_atomic_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "b.txt").write_text("partial")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_dir(target) as staging:
        (staging / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_outputs_get_the_permissions_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            # As safetensors writes its files: owner-only, whatever the umask.
            fd = os.open(tmp / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            (tmp / "script.sh").write_text("")
            (tmp / "script.sh").chmod(0o700)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777
             for path in (tmp_path / "file.txt", tmp_path / "folder" / "weights.bin",
                          tmp_path / "folder" / "script.sh", tmp_path / "folder")}
    assert modes == {"file.txt": 0o644, "weights.bin": 0o644, "script.sh": 0o744,
                     "folder": 0o755}


def test_write_json_and_text_create_parent_folders(tmp_path):
    write_json(tmp_path / "metrics" / "m.json", {"val_loss": 1.5, "name": "ü"})
    assert json.loads((tmp_path / "metrics" / "m.json").read_text()) == {"val_loss": 1.5,
                                                                         "name": "ü"}
    write_text(tmp_path / "deep" / "er" / "t.txt", "x\n")
    assert (tmp_path / "deep" / "er" / "t.txt").read_text() == "x\n"


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 9000  # over two read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_leftovers_of_a_killed_write_are_removed_by_the_next_one(tmp_path):
    target = tmp_path / "tokens"
    (tmp_path / ".tokens.abc123.tmp").mkdir()  # what SIGKILL leaves: no finally ran
    (tmp_path / ".tokens.abc123.tmp" / "train.bin").write_bytes(b"half")
    (tmp_path / ".meta.json.x1.tmp").write_text("{")
    (tmp_path / ".other.x.tmp").write_text("not ours")
    with atomic_dir(target) as staging:
        (staging / "train.bin").write_bytes(b"whole")
    write_json(tmp_path / "meta.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x.tmp", "meta.json", "tokens"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics" / "train.json"
    write_json(target, {"old": 1})
    monkeypatch.setattr(os, "fsync", no_space)  # where a full disk reports delayed writes
    with pytest.raises(DiskFull, match=re.escape(f"{target}: no space left on device while "
                                                 f"writing the metrics; free some space")):
        write_json(target, {"new": 2}, "the metrics")
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["train.json"]


def write_shards(target):
    # A file of the folder written with its own atomic_path: the folder is named.
    with (atomic_dir(target, "token shards") as staging,
          atomic_path(staging / "train.bin", "a token file") as tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_inside_a_folder_names_the_folder_and_what_it_holds(tmp_path):
    target = tmp_path / "tokens"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    expected = re.escape(f"{target}: no space left on device while writing token shards")
    with pytest.raises(DiskFull, match=expected):
        write_shards(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
    assert [p.name for p in target.iterdir()] == ["old.bin"]


@pytest.mark.parametrize(("error", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("No space left on device (os error 28)"), True),  # as safetensors says it
    (OSError(errno.EACCES, "Permission denied"), False),
    (ValueError("os error 28 mentioned in passing"), False),
])
def test_a_full_disk_is_recognised_however_it_is_reported(error, full):
    assert disk_full(error) is full


def test_a_replaced_folder_left_behind_by_a_kill_is_removed(tmp_path):
    (tmp_path / ".models.x1.old").mkdir()  # killed between moving the old folder aside and
    (tmp_path / ".models.x1.old" / "models").mkdir()  # deleting it
    with atomic_dir(tmp_path / "models") as staging:
        (staging / "w").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_caches_are_the_projects_also_for_experiments_dvc_runs_in_a_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cache_dir("runs") == Path(".gptlab") / "runs"
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "celery" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert cache_dir("downloads") == tmp_path.resolve() / ".gptlab" / "downloads"


def test_a_full_disk_elsewhere_keeps_its_own_name_inside_a_folder_being_written(tmp_path):
    """A download into the cache that fills the disk names the cache, not the raw folder."""
    cache_file = tmp_path / "cache" / "x.part"
    expected = re.escape(f"{cache_file}: no space left on device while writing a download")
    with (pytest.raises(DiskFull, match=expected), atomic_dir(tmp_path / "raw", "the corpus"),
          disk_full_named(cache_file, "a download")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
