"""The DVC pipeline end to end, in a temporary git repo holding a copy of the project."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, with_overrides, write_params
from test_train import TINY_MODEL, TINY_TRAIN

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# Everything the stages write: a copy of the project must not bring the checkout's outputs.
STAGE_OUTPUTS = tuple(
    next(iter(out)) if isinstance(out, dict) else out
    for spec in DVC_YAML["stages"].values()
    for out in spec.get("outs", []) + spec.get("metrics", [])
)


def gptlab_modules(script: Path) -> set[str]:
    """The gptlab modules a script imports, directly or through other gptlab modules."""
    found: set[str] = set()
    pending = [script]
    while pending:
        tree = ast.parse(pending.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("gptlab.") and name not in found:
                    found.add(name)
                    pending.append(ROOT / "src" / (name.replace(".", "/") + ".py"))
    return found


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stage_deps_list_exactly_the_code_it_runs(stage):
    spec = DVC_YAML["stages"][stage]
    script = spec["cmd"].split()[-1]
    code_deps = {d for d in spec["deps"] if d.endswith(".py")}
    expected = {script} | {f"src/{m.replace('.', '/')}.py" for m in gptlab_modules(ROOT / script)}
    assert code_deps == expected


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stage_reads_exactly_the_params_sections_it_declares(stage):
    spec = DVC_YAML["stages"][stage]
    script_text = (ROOT / spec["cmd"].split()[-1]).read_text()
    used = set(re.findall(r"\bparams\.(\w+)", script_text))
    assert used == set(spec["params"])


def make_project(tmp_path: Path) -> Path:
    """Copy the checkout's files (not its outputs or lock file) into a fresh git repo."""
    project = tmp_path / "project"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in listed:
        source = ROOT / name
        if name == "dvc.lock" or name.startswith(STAGE_OUTPUTS) or not source.is_file():
            continue
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, project / name)
    return project


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def dvc(project: Path, *args: str) -> str:
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(project.parent)}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


PLAYS = {
    "hamlet.txt": "Who's there? Nay, answer me: stand, and unfold yourself.\n",
    "macbeth.txt": "When shall we three meet again in thunder, lightning, or in rain?\n",
    "lear.txt": "Meantime we shall express our darker purpose. Give me the map there.\n",
    "tempest.txt": "Boatswain! Here, master: what cheer? Good, speak to the mariners.\n",
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, default_params):
    """A project repo whose tokenize stage has run once on a small local corpus."""
    project = make_project(tmp_path_factory.mktemp("e2e"))
    corpus = project / "corpus"
    corpus.mkdir()
    for index, (name, line) in enumerate(PLAYS.items()):
        (corpus / name).write_text(f"{name.upper()}\n\n" + line * (40 + 10 * index))
    params = with_overrides(default_params, {
        "data": {"source": "local", "spec": "corpus", "sha256": None, "include": ["*.txt"]},
        "clean.min_chars": 100,
        **{f"model.{key}": value for key, value in TINY_MODEL.items()},
        **{f"train.{key}": value for key, value in TINY_TRAIN.items()},
    })
    write_params(project, params)
    git(project, "init", "-q")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    first_run = dvc(project, "repro", "tokenize")
    return project, first_run


def test_repro_runs_every_data_stage_and_writes_outputs(pipeline):
    project, first_run = pipeline
    for stage in ("download", "clean", "tokenize"):
        assert f"Running stage '{stage}'" in first_run
    manifest = yaml.safe_load((project / "data/raw/manifest.json").read_text())
    assert manifest["file_count"] == len(PLAYS)
    clean = yaml.safe_load((project / "metrics/clean.json").read_text())
    assert clean["docs_in"] == len(PLAYS) and clean["val_docs"] >= 1
    tokens = yaml.safe_load((project / "metrics/tokenize.json").read_text())
    assert tokens["train_tokens"] == clean["train_chars"]  # char-level: one token per character
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (project / "data/tokens" / name).is_file()


def test_second_repro_does_nothing(pipeline):
    project, _ = pipeline
    second = dvc(project, "repro", "tokenize")
    assert "Running stage" not in second
    assert "up to date" in dvc(project, "status", "tokenize")


def test_repro_train_runs_only_train_and_writes_model_log_metrics(pipeline):
    project, _ = pipeline
    run = dvc(project, "repro", "train")
    assert "Running stage 'train'" in run
    assert not any(f"Running stage '{s}'" in run for s in ("download", "clean", "tokenize"))
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["final_val_loss"] > 0 and metrics["dtype"] == "float32"
    assert (project / "models/model.safetensors").is_file()
    log = (project / "plots/train_log.csv").read_text().splitlines()
    assert log[0] == "step,tokens,train_loss,val_loss,lr,grad_norm,tokens_per_sec"
    assert "Running stage" not in dvc(project, "repro", "train")


def test_model_param_change_reruns_train_only(pipeline):
    project, _ = pipeline
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, with_overrides(params, {"model.n_layer": 1}))
    rerun = dvc(project, "repro", "train")
    assert "Running stage 'train'" in rerun and "Running stage 'tokenize'" not in rerun
    config = json.loads((project / "models/config.json").read_text())
    assert config["model"]["n_layer"] == 1


def test_tokenizer_change_reruns_tokenize_only(pipeline):
    project, _ = pipeline
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"] = {**params["tokenizer"], "kind": "bpe", "vocab_size": 300}
    write_params(project, params)
    rerun = dvc(project, "repro", "tokenize")
    assert "Running stage 'tokenize'" in rerun
    assert "Running stage 'download'" not in rerun and "Running stage 'clean'" not in rerun
    meta = yaml.safe_load((project / "data/tokens/meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == 300
