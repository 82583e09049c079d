"""The DVC pipeline end to end, in a temporary git repo holding a copy of the project."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    ALL_STAGES,
    DVC_YAML,
    PLAYS,
    ROOT,
    change_params,
    copy_project,
    dvc,
    ran_stages,
    stage_script,
)

from gptlab.errors import GptlabError
from gptlab.pipeline import changes, with_generated_deps

LOCK = "requirements.lock"
DVC_LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text())
PARAMS_YAML = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_dvc_yaml_lists_the_code_each_stage_runs_as_gptlab_stages_writes_it():
    text = (ROOT / "dvc.yaml").read_text()
    generated = with_generated_deps(ROOT, text)
    assert generated == text, (f"dvc.yaml's deps are stale: run `make deps`\n"
                               f"{changes(text, generated)}")


# --- gptlab stages: dvc.yaml's code deps written from the scripts' imports --------------------

PROJECT_DVC_YAML = """\
# A comment that stays.
stages:
  prepare:
    cmd: sh stages/run prepare.py data/raw data/ready
    deps:
      - stages/prepare.py
      - src/gptlab/removed.py
      - requirements.lock
      - data/raw
    outs:
      - data/ready

  report:
    # Another comment.
    cmd: sh stages/run report.py data/ready
    deps:
      - data/ready
      - stages/report.py
artifacts:
  deps:
    path: models
"""


def small_project(root: Path) -> Path:
    """A project of two stage scripts over a package whose modules import each other."""
    files = {"src/gptlab/__init__.py": "", "src/gptlab/io.py": "",
             "src/gptlab/clean/__init__.py": "from .rules import rule\n",
             "src/gptlab/clean/rules.py": "from gptlab.io import x\n",
             "src/gptlab/unused.py": "",
             "stages/prepare.py": "from gptlab.clean import rule\n",
             "stages/report.py": "import json\n",
             "dvc.yaml": PROJECT_DVC_YAML}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_gptlab_stages_writes_script_then_sorted_modules_then_the_other_deps(tmp_path):
    root = small_project(tmp_path)
    written = with_generated_deps(root, PROJECT_DVC_YAML)
    stages = yaml.safe_load(written)["stages"]
    assert stages["prepare"]["deps"] == [
        "stages/prepare.py", "src/gptlab/__init__.py", "src/gptlab/clean/__init__.py",
        "src/gptlab/clean/rules.py", "src/gptlab/io.py", "requirements.lock", "data/raw"]
    assert stages["report"]["deps"] == ["stages/report.py", "data/ready"]
    # Only the deps lists change: comments, blank lines and every other key stay.
    kept = [line for line in PROJECT_DVC_YAML.splitlines() if not line.startswith("      - ")]
    assert [line for line in written.splitlines() if not line.startswith("      - ")] == kept
    assert with_generated_deps(root, written) == written


def test_gptlab_stages_fails_on_stale_deps_and_write_fixes_them(tmp_path):
    root = small_project(tmp_path)
    gptlab = [sys.executable, "-m", "gptlab.cli", "stages"]
    check = subprocess.run(gptlab, cwd=root, capture_output=True, text=True)
    assert check.returncode == 1
    assert "-      - src/gptlab/removed.py" in check.stdout
    assert check.stderr.startswith("error: dvc.yaml: the stages' deps are not what")
    subprocess.run([*gptlab, "--write"], cwd=root, check=True, capture_output=True)
    assert (root / "dvc.yaml").read_text() == with_generated_deps(root, PROJECT_DVC_YAML)
    again = subprocess.run(gptlab, cwd=root, capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_deps_list_gptlab_stages_cannot_rewrite_in_place_is_one_error(tmp_path):
    root = small_project(tmp_path)
    lock = "      - requirements.lock\n"
    commented = PROJECT_DVC_YAML.replace(lock, "      # the locked libraries\n" + lock)
    with pytest.raises(GptlabError, match=r"^dvc.yaml: cannot rewrite the stages' deps in place"):
        with_generated_deps(root, commented)


# --- dvc.lock: the committed results are those of the committed code and params ---------------


def cached_outputs() -> set[str]:
    """The outputs DVC keeps in its cache (data/..., models): not in git, so a clone has no
    file to hash; dvc.lock records a folder's hash as the md5 of its listing (`.dir`)."""
    found = set()
    for spec in DVC_YAML["stages"].values():
        for out in spec.get("outs", []) + spec.get("metrics", []):
            path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if options.get("cache", True):
                found.add(path)
    return found


@pytest.mark.parametrize("stage", sorted(DVC_LOCK["stages"]))
def test_dvc_lock_records_the_committed_files_and_params(stage):
    """What `dvc status` compares, on a clone: a stale record means the committed metrics,
    samples and plots are not those of the committed code."""
    spec, recorded = DVC_YAML["stages"][stage], DVC_LOCK["stages"][stage]
    rerun = "run `make repro` and commit dvc.lock with the outputs"
    cached = cached_outputs()
    changed = []
    for entry in recorded["deps"] + recorded.get("outs", []):
        if entry["path"] in cached:
            continue  # in DVC's cache alone: checked against the stage that makes it, below
        path = ROOT / entry["path"]
        # DVC 3 hashes a file's bytes as they are (no newline conversion).
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != entry["md5"]:
            changed.append(entry["path"])
    assert not changed, (f"dvc.lock: stage {stage}: {', '.join(changed)} changed since its last "
                         f"run: {rerun}")
    listed = {dep["path"] for dep in recorded["deps"]} ^ set(spec["deps"])
    assert not listed, (f"dvc.lock: stage {stage}: deps {', '.join(sorted(listed))} are not "
                        f"those dvc.yaml lists: {rerun}")
    assert recorded["cmd"] == spec["cmd"], f"dvc.lock: stage {stage}'s command changed: {rerun}"
    wanted = {key: PARAMS_YAML.get(key) for key in spec["params"]}
    assert recorded["params"]["params.yaml"] == wanted, (
        f"dvc.lock: stage {stage}'s params are not params.yaml's: {rerun}")


def test_dvc_lock_records_each_cached_output_as_its_users_saw_it():
    made = {out["path"]: out["md5"] for stage in DVC_LOCK["stages"].values()
            for out in stage.get("outs", [])}
    for name, stage in DVC_LOCK["stages"].items():
        for dep in stage["deps"]:
            if dep["path"] in made:
                assert dep["md5"] == made[dep["path"]], (
                    f"dvc.lock: stage {name} ran on another {dep['path']} than the one recorded: "
                    f"run `make repro`")


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stages_whose_results_libraries_can_change_depend_on_the_lock(stage):
    # download's files are checked against their sha256, whatever the libraries' versions.
    assert (LOCK in DVC_YAML["stages"][stage]["deps"]) == (stage != "download")


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stage_reads_exactly_the_params_sections_it_declares(stage):
    spec = DVC_YAML["stages"][stage]
    script_text = (ROOT / stage_script(stage)).read_text()
    used = set(re.findall(r"\bparams\.(\w+)", script_text))
    assert used == set(spec["params"])


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stage_paths_are_written_in_dvc_yaml_alone(stage):
    """Every path a stage writes or reads from the pipeline comes from its command line."""
    spec = DVC_YAML["stages"][stage]
    launcher, run, _, *paths = spec["cmd"].split()
    assert (launcher, run) == ("sh", "stages/run")  # the project's environment, the tree's code
    script = stage_script(stage)
    outputs = [next(iter(out)) if isinstance(out, dict) else out
               for out in spec.get("outs", []) + spec.get("metrics", [])]
    # Each output is a path the command names, or lies in a folder it names.
    assert all(any(out == p or out.startswith(p + "/") for p in paths) for out in outputs)
    data_deps = [dep for dep in spec["deps"] if not dep.endswith(".py") and dep != LOCK]
    assert all(dep in paths for dep in data_deps)
    script_text = (ROOT / script).read_text()
    assert not re.search(r'Path\("(data|models|metrics|plots|samples)\b', script_text)


def test_repro_runs_every_stage_and_writes_every_output(pipeline):
    project, first_run = pipeline
    assert ran_stages(first_run) == ALL_STAGES
    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    assert manifest["file_count"] == len(PLAYS) + 1
    clean = json.loads((project / "metrics/clean.json").read_text())
    assert clean["docs_exact_duplicates"] == 1 and clean["val_docs"] >= 1
    tokens = json.loads((project / "metrics/tokenize.json").read_text())
    assert tokens["train_tokens"] == clean["train_chars"]  # char-level: one token per character
    train = json.loads((project / "metrics/train.json").read_text())
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["tokens"] == tokens["val_tokens"] - 1  # every val token but the first
    assert evaluation["val_loss"] == pytest.approx(train["final_val_loss"], abs=0.3)
    sample = json.loads((project / "metrics/sample.json").read_text())
    assert sample["generated_tokens"] == 2 * 40 and sample["tokens_per_sec"] > 0
    assert (project / "samples/samples.md").read_text().count("```") >= 4
    log = (project / "plots/train_log.csv").read_text().splitlines()
    assert log[0] == "step,tokens,train_loss,val_loss,lr,grad_norm,tokens_per_sec"
    for figure in ("loss.png", "lr.png", "throughput.png"):
        assert (project / "plots" / figure).read_bytes().startswith(b"\x89PNG")


def test_second_repro_does_nothing(pipeline):
    project, _ = pipeline
    assert ran_stages(dvc(project, "repro")) == set()
    assert "up to date" in dvc(project, "status")


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"sample.temperature": 0.5}, {"sample"}),
    ({"plot.dpi": 80}, {"plot"}),
    ({"model.n_layer": 1}, {"train", "evaluate", "sample", "plot"}),
    ({"tokenizer.kind": "bpe", "tokenizer.vocab_size": 300},
     {"tokenize", "train", "evaluate", "sample", "plot"}),
    ({"clean.dedupe": "none"}, {"clean", "tokenize", "train", "evaluate", "sample", "plot"}),
])
def test_a_param_change_reruns_exactly_the_stages_that_depend_on_it(pipeline, tmp_path,
                                                                     overrides, expected):
    project = copy_project(pipeline[0], tmp_path)
    change_params(project, overrides)
    assert ran_stages(dvc(project, "repro")) == expected


@pytest.mark.parametrize(("module", "expected"), [
    ("model.py", {"train", "evaluate", "sample"}),  # not plot: the log format has no torch
    ("trainlog.py", {"train", "plot"}),
    ("encode.py", {"tokenize"}),  # not train or evaluate: they read token files, not encode
])
def test_a_code_change_reruns_exactly_the_stages_that_run_it(pipeline, tmp_path, module,
                                                              expected):
    project = copy_project(pipeline[0], tmp_path)
    with open(project / "src" / "gptlab" / module, "a") as source:
        source.write("\n# an edit\n")
    # `dvc status` lists the stages whose own deps changed (not those downstream of them).
    assert set(json.loads(dvc(project, "status", "--json"))) == expected
