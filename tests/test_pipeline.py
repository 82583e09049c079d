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
ALL_STAGES = {"download", "clean", "tokenize", "train", "evaluate", "sample", "plot"}
TINY_SAMPLE = {"num_samples": 2, "max_new_tokens": 40, "prompts": ["\n"]}


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def change_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, with_overrides(params, overrides))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, default_params):
    """A project repo on a small local corpus (one play twice) whose pipeline has run once."""
    project = make_project(tmp_path_factory.mktemp("e2e"))
    corpus = project / "corpus"
    corpus.mkdir()
    for index, (name, line) in enumerate(PLAYS.items()):
        (corpus / name).write_text(f"{name.upper()}\n\n" + line * (40 + 10 * index))
    shutil.copy(corpus / "hamlet.txt", corpus / "hamlet_again.txt")  # work for the deduper
    write_params(project, with_overrides(default_params, {
        "data.source": "local", "data.spec": "corpus", "data.sha256": None,
        "data.include": ["*.txt"],
        "clean.min_chars": 100,
        **{f"model.{key}": value for key, value in TINY_MODEL.items()},
        **{f"train.{key}": value for key, value in TINY_TRAIN.items()},
        **{f"sample.{key}": value for key, value in TINY_SAMPLE.items()},
    }))
    git(project, "init", "-q")
    commit(project, "init")
    first_run = dvc(project, "repro")
    return project, first_run


def commit(project: Path, message: str) -> None:
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


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
    ({"model.n_layer": 1}, {"train", "evaluate", "sample", "plot"}),
    ({"tokenizer.kind": "bpe", "tokenizer.vocab_size": 300},
     {"tokenize", "train", "evaluate", "sample", "plot"}),
    ({"clean.dedupe": "none"}, {"clean", "tokenize", "train", "evaluate", "sample", "plot"}),
])
def test_a_param_change_reruns_exactly_the_stages_that_depend_on_it(pipeline, overrides,
                                                                     expected):
    project, _ = pipeline
    change_params(project, overrides)
    assert ran_stages(dvc(project, "repro")) == expected


def test_experiments_show_metrics_and_plots_diff_has_the_loss_curve(pipeline):
    project, _ = pipeline
    commit(project, "baseline")
    dvc(project, "exp", "run", "-S", "model.n_layer=2", "-n", "two-layers")
    table = dvc(project, "exp", "show", "--csv")
    header = table.splitlines()[0].split(",")
    assert "val_loss" in header and "model.n_layer" in header
    assert "two-layers" in table
    diff = json.loads(dvc(project, "plots", "diff", "two-layers", "--json"))
    curves = json.dumps(diff)
    assert "train_loss" in curves and "val_loss" in curves
