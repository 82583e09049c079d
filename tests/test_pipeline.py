"""The DVC pipeline end to end, in a temporary git repo holding a copy of the project."""

from __future__ import annotations

import json
import re

import pytest
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

from gptlab.checkpoint import gptlab_imports

LOCK = "requirements.lock"


@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_stage_deps_list_exactly_the_code_it_runs(stage):
    spec = DVC_YAML["stages"][stage]
    script = stage_script(stage)
    code_deps = {d for d in spec["deps"] if d.endswith(".py")}
    imported = {path.relative_to(ROOT).as_posix() for path in gptlab_imports(ROOT / script)}
    assert code_deps == {script} | imported


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


def test_experiments_show_metrics_and_plots_diff_has_the_loss_curve(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    dvc(project, "exp", "run", "-S", "model.n_layer=1", "-n", "one-layer")
    table = dvc(project, "exp", "show", "--csv")
    header = table.splitlines()[0].split(",")
    assert "val_loss" in header and "model.n_layer" in header
    assert "one-layer" in table
    diff = json.loads(dvc(project, "plots", "diff", "one-layer", "--json"))
    curves = json.dumps(diff)
    assert "train_loss" in curves and "val_loss" in curves
