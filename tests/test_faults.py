"""Nothing lost under faults: a kill at any moment, a full disk, a damaged checkpoint.

Every fault is made for real: SIGKILL of the stage (or of `dvc repro` and everything it
started) at seeded random moments and at the moments that matter most, a small filesystem that
fills up (a tmpfs mounted in a user namespace), bytes flipped in a checkpoint on disk. The run
after the fault must end as an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    STAGE_OUTPUTS,
    assert_same_training,
    copy_project,
    dvc,
    dvc_run,
    ran_stages,
    run_stage,
    stage_command,
    start_train,
    train_project,
    write_params,
)

from gptlab.sources import describe_files

KILLS = 3


def kill_at(process: subprocess.Popen, seconds: float) -> None:
    """SIGKILL the process (and the group it leads) `seconds` from now, unless it ended."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def kill_when(process: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL the process group as soon as ready() holds."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within two minutes"
        time.sleep(0.001)  # leave the cores to the stage
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish_train(project: Path) -> str:
    process = start_train(project)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    return stderr


# --- the train stage killed ---------------------------------------------------------------------


def test_train_killed_at_random_moments_ends_as_an_uninterrupted_run(
        tmp_path, char_tokens, default_params, uninterrupted_train):
    reference, seconds = uninterrupted_train
    project = train_project(tmp_path, char_tokens, default_params)
    moments = random.Random(16)  # seeded: the same kills on every run of the test
    for _ in range(KILLS):
        kill_at(start_train(project, start_new_session=True), moments.uniform(0.5, seconds))
    finish_train(project)
    assert_same_training(project, reference)


def test_train_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
        tmp_path, char_tokens, default_params, uninterrupted_train):
    project = train_project(tmp_path, char_tokens, default_params)
    runs = project / ".gptlab" / "runs"
    process = start_train(project, start_new_session=True)
    # The second checkpoint's staging folder: the first is complete, the second half-written.
    kill_when(process, lambda: list(runs.glob("*/.step-00000020.*.tmp")), "checkpoint write")
    assert [p.name for p in runs.glob("*/step-*")] == ["step-00000010"]
    assert "resuming from step 10" in finish_train(project)
    assert_same_training(project, uninterrupted_train[0])
    assert not list(runs.glob("*/.*"))  # the half-written checkpoint is gone


def test_a_finished_run_whose_outputs_are_gone_publishes_them_again(
        tmp_path, char_tokens, default_params, uninterrupted_train):
    """As after a kill between the last checkpoint and DVC's recording of the outputs, or
    after `dvc repro -f`, which deletes the outputs before rerunning a finished stage."""
    project = train_project(tmp_path, char_tokens, default_params)
    runs = project / ".gptlab" / "runs"
    process = start_train(project, start_new_session=True)
    kill_when(process, lambda: list(runs.glob("*/step-00000100")), "final checkpoint")
    outputs = [project / name for name in ("models", "plots/train_log.csv", "metrics")]
    for round_ in range(2):
        for output in outputs:
            shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(
                missing_ok=True)
        assert "resuming from step 100" in finish_train(project)
        published = {path: path.read_bytes() for output in outputs
                     for path in ([output] if output.is_file() else sorted(output.rglob("*")))}
        if round_ == 0:
            first = published
    assert published == first  # metrics too: republished from the checkpoint, byte for byte
    assert_same_training(project, uninterrupted_train[0])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", [1, 2])
def test_a_damaged_checkpoint_is_reported_and_the_run_falls_back(
        tmp_path, uninterrupted_train, damaged):
    reference, _ = uninterrupted_train
    project = tmp_path / "project"
    shutil.copytree(reference, project)
    checkpoints = sorted(project.glob(".gptlab/runs/*/step-*"), reverse=True)
    assert [p.name for p in checkpoints] == ["step-00000100", "step-00000090"]
    flip_a_byte(checkpoints[0] / "model.safetensors")
    if damaged == 2:
        (checkpoints[1] / "state.safetensors").write_bytes(b"truncated")
    shutil.rmtree(project / "models")
    stderr = finish_train(project)
    assert (f"{checkpoints[0].relative_to(project)}: damaged resume checkpoint "
            f"(model.safetensors is not the file that was written") in stderr
    if damaged == 1:
        assert "removed it, falling back to step-00000090" in stderr
        assert "resuming from step 90" in stderr
    else:
        assert "no good resume checkpoint left: starting afresh" in stderr
    assert_same_training(project, reference)
    # Never a crash loop: the damaged checkpoints are gone, the next rerun resumes cleanly.
    assert "resuming from step 100" in finish_train(project)


# --- clean and tokenize killed ------------------------------------------------------------------


def pseudo_documents(folder: Path, count: int, words: int) -> None:
    """Seeded documents of pseudo-words, none a near-duplicate of another, as a local corpus
    in data/raw."""
    vocabulary = [f"{a}{b}{c}" for a in "bcdfghklmnprstvw" for b in "aeiou" for c in
                  ("", "n", "r", "st", "th", "ld", "ng", "ck", "ll", "ss", "m", "x")]
    rng = np.random.default_rng(7)
    raw = folder / "data" / "raw"
    for index in range(count):
        text = " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), words))
        lines = "\n".join(text[i : i + 70] for i in range(0, len(text), 70))
        (raw / "texts").mkdir(parents=True, exist_ok=True)
        (raw / "texts" / f"doc{index:02d}.txt").write_text(lines + "\n", encoding="utf-8")
    (raw / "manifest.json").write_text(json.dumps(describe_files(raw)))


def outputs_of(folder: Path, names: list[str]) -> dict[str, bytes]:
    found = {}
    for name in names:
        top = folder / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file():
                found[str(path.relative_to(folder))] = path.read_bytes()
    return found


def stage_killed_at_random_moments(stage: str, reference: Path, project: Path) -> None:
    started = time.monotonic()
    assert run_stage(stage, reference).returncode == 0
    seconds = time.monotonic() - started
    moments = random.Random(len(stage))
    for _ in range(KILLS):
        process = subprocess.Popen(stage_command(stage), cwd=project, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_at(process, moments.uniform(0.2, seconds))
    result = run_stage(stage, project)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_clean_killed_at_random_moments_writes_what_an_uninterrupted_run_writes(
        tmp_path, params_for):
    for name in ("reference", "killed"):
        pseudo_documents(tmp_path / name, count=12, words=60_000)
        write_params(tmp_path / name, params_for())
    stage_killed_at_random_moments("clean", tmp_path / "reference", tmp_path / "killed")
    names = ["data/clean", "metrics/clean.json"]
    assert outputs_of(tmp_path / "killed", names) == outputs_of(tmp_path / "reference", names)
    assert sorted(p.name for p in (tmp_path / "killed" / "data").iterdir()) == ["clean", "raw"]


@pytest.mark.slow
def test_tokenize_killed_at_random_moments_writes_what_an_uninterrupted_run_writes(
        tmp_path, params_for):
    text = " ".join(f"word{i % 997}" for i in range(300_000))
    for name in ("reference", "killed"):
        clean = tmp_path / name / "data" / "clean"
        clean.mkdir(parents=True)
        (clean / "train.txt").write_text(text, encoding="utf-8")
        (clean / "val.txt").write_text(text[:20_000], encoding="utf-8")
        write_params(tmp_path / name, params_for({"tokenizer.kind": "bpe",
                                                  "tokenizer.vocab_size": 400}))
    stage_killed_at_random_moments("tokenize", tmp_path / "reference", tmp_path / "killed")
    names = ["data/tokens"]
    assert outputs_of(tmp_path / "killed", names) == outputs_of(tmp_path / "reference", names)
    assert sorted(p.name for p in (tmp_path / "killed" / "data").iterdir()) == ["clean",
                                                                               "tokens"]


# --- dvc repro killed ---------------------------------------------------------------------------


def fresh_copy(pipeline: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the pipeline's project with no outputs, no lock file and no resume state."""
    project = copy_project(pipeline[0], tmp_path)
    for name in (*STAGE_OUTPUTS, "dvc.lock", ".gptlab"):
        path = project / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return project


def start_dvc(project: Path, *args: str) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=project, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(project.parent)})


def assert_same_pipeline(project: Path, reference: Path) -> None:
    data = ["data/raw", "data/clean", "data/tokens", "samples/samples.md"]
    assert outputs_of(project, data) == outputs_of(reference, data)
    assert_same_training(project, reference)
    assert "up to date" in dvc(project, "status")


def test_dvc_repro_killed_at_random_moments_ends_as_an_uninterrupted_run(pipeline, tmp_path):
    project = fresh_copy(pipeline, tmp_path)
    moments = random.Random(10)
    for _ in range(KILLS):
        kill_at(start_dvc(project, "repro"), moments.uniform(1.0, 10.0))
    dvc(project, "repro")
    assert_same_pipeline(project, pipeline[0])


def test_dvc_killed_while_recording_the_train_stage_reruns_it_to_the_same_outputs(
        pipeline, tmp_path):
    project = fresh_copy(pipeline, tmp_path)
    process = start_dvc(project, "repro")
    for line in process.stdout:
        if line.startswith("final_train_loss="):  # the stage is done; DVC hashes its outputs
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert ran_stages(dvc(project, "repro")) >= {"train"}
    assert_same_pipeline(project, pipeline[0])


# --- a full disk ----------------------------------------------------------------------------------

DISK_MB = 16


def can_mount_in_a_namespace() -> bool:
    try:
        result = subprocess.run(["unshare", "-rm", "sh", "-c",
                                 "mount -t tmpfs -o size=1m tmpfs /tmp && echo mounted"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip() == "mounted"


MOUNTS = can_mount_in_a_namespace()

# Run each command on a small disk: a tmpfs mounted over `disk`, filled up but for `free`
# bytes; the filler is removed before the second command, as a user frees space.
ON_A_SMALL_DISK = """
set -u
mount -t tmpfs -o size={size}m tmpfs {disk}
head -c $(( {size} * 1048576 - {free} )) /dev/zero > {disk}/filler 2>/dev/null
{first} > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.code
ls -A {disk} > {out}/left.txt
find {disk} -maxdepth 3 -name 'step-*' > {out}/checkpoints.txt
rm {disk}/filler
{second} > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.code
"""


def on_a_small_disk(project: Path, disk: str, free: int, first: list[str],
                    second: list[str]) -> dict[str, str]:
    """Run `first`, then `second` after freeing space, in `project` with `disk` (a folder of
    it) on a small filesystem; their exit codes and outputs, and what was left on the disk."""
    out = project.parent / "results"
    out.mkdir()
    (project / disk).mkdir(parents=True, exist_ok=True)
    script = ON_A_SMALL_DISK.format(size=DISK_MB, disk=project / disk, free=free,
                                    first=" ".join(first), second=" ".join(second), out=out)
    subprocess.run(["unshare", "-rm", "sh", "-c", f"cd {project} && {script}"], check=True,
                   timeout=600)
    return {path.name: path.read_text() for path in out.iterdir()}


def stage_with(stage: str, **paths: str) -> list[str]:
    """The stage's command, some of its paths replaced (to put one output on a small disk)."""
    command = stage_command(stage)
    _, _, *defaults = command
    names = {"train": ["tokens", "models", "log", "metrics"],
             "tokenize": ["clean", "tokens", "metrics"],
             "clean": ["raw", "clean", "metrics"]}[stage]
    chosen = [paths.get(name, default) for name, default in zip(names, defaults, strict=True)]
    return [*command[:2], *chosen]


needs_mount = pytest.mark.skipif(not MOUNTS, reason="cannot mount a tmpfs in a user namespace")


@needs_mount
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_resumes(
        tmp_path, char_tokens, default_params, uninterrupted_train):
    reference, _ = uninterrupted_train
    one_checkpoint = sum(path.stat().st_size for path in
                         next(reference.glob(".gptlab/runs/*/step-*")).iterdir())
    project = train_project(tmp_path / "project", char_tokens, default_params)
    # Room for one checkpoint and a half: the second cannot be written whole.
    results = on_a_small_disk(project, ".gptlab", int(1.5 * one_checkpoint) + 65536,
                              stage_with("train"), stage_with("train"))
    assert results["first.code"].strip() == "1"
    line = one_error_line_of(results["first.err"])
    assert "no space left on device while writing a resume checkpoint" in line
    assert "step-00000020" in line
    assert results["checkpoints.txt"].count("step-") == 1  # the previous one, whole
    assert "resuming from step 10" in results["second.err"], results["second.err"]
    assert results["second.code"].strip() == "0"
    assert_same_training(project, reference)


def one_error_line_of(stderr: str) -> str:
    """The error a stage ended with: its last line, the only one of its kind, no traceback
    (progress lines of the work done before the fault may come first)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in stderr, stderr
    return lines[-1]


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize(("stage", "output", "what"), [
    ("train", "models", "the trained model"),
    ("train", "metrics", "the training metrics"),
    ("tokenize", "tokens", "token shards"),
    ("clean", "clean", "the clean text"),
])
def test_a_full_disk_names_what_was_written_leaves_nothing_and_the_rerun_finishes(
        tmp_path, char_tokens, default_params, params_for, stage, output, what):
    project = tmp_path / "project"
    if stage == "train":
        train_project(project, char_tokens, default_params)
    elif stage == "tokenize":
        for split in ("train", "val"):
            (project / "data" / "clean").mkdir(parents=True, exist_ok=True)
            (project / "data" / "clean" / f"{split}.txt").write_text("to be or not\n" * 999)
        write_params(project, params_for())
    else:
        pseudo_documents(project, count=3, words=20_000)
        write_params(project, params_for({"clean.split": "tail"}))
    target = "small/" + {"metrics": "train.json"}.get(output, output)
    command = stage_with(stage, **{output: target})
    results = on_a_small_disk(project, "small", 0, command, command)
    line = one_error_line_of(results["first.err"])
    assert f"{target}: no space left on device while writing {what}" in line
    assert results["first.code"].strip() == "1"
    assert results["left.txt"].split() == ["filler"]  # nothing partial beside it
    assert results["second.code"].strip() == "0", results["second.err"]


@pytest.mark.slow
def test_without_a_mount_a_failing_flush_is_the_full_disk(tmp_path, char_tokens,
                                                          default_params):
    """Where no filesystem can be mounted, the write's OS call is made to fail instead."""
    project = train_project(tmp_path, char_tokens, default_params)
    failing_fsync = ("import errno, os, runpy, sys\n"
                     "real = os.fsync\n"
                     "def fsync(fd):\n"
                     "    if 'models' in os.readlink(f'/proc/self/fd/{fd}'):\n"
                     "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                     "    return real(fd)\n"
                     "os.fsync = fsync\n"
                     "sys.argv = sys.argv[1:]\n"
                     "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", failing_fsync, *stage_command("train")[1:]],
                            cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "models: no space left on device while writing the trained model" in (
        one_error_line_of(result.stderr))
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".models")) == []
    assert not (project / "models").exists()
    resumed = start_train(project)
    assert resumed.wait() == 0 and (project / "models" / "model.safetensors").exists()


# --- the same faults under dvc repro --------------------------------------------------------------


def dvc_command(project: Path, *args: str) -> list[str]:
    """`dvc ARGS` as a shell word list, with a PATH of this environment and the system only."""
    bin_dir = Path(sys.executable).parent
    return ["env", f"PATH={bin_dir}:/usr/bin:/bin", f"HOME={project.parent}", sys.executable,
            "-m", "dvc", *args]


def test_dvc_repro_falls_back_from_a_damaged_checkpoint(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    newest = sorted(project.glob(".gptlab/runs/*/step-*"))[-1]
    flip_a_byte(newest / "state.safetensors")
    result = dvc_run(project, "repro", "-f", "-s", "train")
    assert result.returncode == 0, result.stderr
    assert "damaged resume checkpoint" in result.stderr
    assert "falling back to step-" in result.stderr
    assert_same_training(project, pipeline[0])


@needs_mount
def test_dvc_repro_on_a_full_disk_stops_in_one_line_and_finishes_once_there_is_room(
        pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path / "copy")
    repro = dvc_command(project, "repro", "-f", "-s", "train")
    # The resume folder on a full disk: the train stage's first checkpoint cannot be written.
    results = on_a_small_disk(project, ".gptlab", 0, repro, repro)
    assert results["first.code"].strip() != "0"
    assert "no space left on device while writing a resume checkpoint" in (
        results["first.out"] + results["first.err"])
    assert results["second.code"].strip() == "0", results["second.out"] + results["second.err"]
    assert_same_training(project, pipeline[0])
