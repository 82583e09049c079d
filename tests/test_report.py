"""gptlab.lab.report: a run's report card, built from what its stages wrote."""

from __future__ import annotations

import json
import re

import pytest
from helpers import change_params, copy_project

from gptlab.errors import GptlabError
from gptlab.lab.report import (
    FIGURES,
    downstream,
    experiment_record,
    render,
    workspace_record,
    write_report,
)


def test_the_workspace_report_says_what_the_stages_recorded(pipeline, tmp_path):
    project = pipeline[0]
    run = workspace_record(project)
    assert not run.dirty
    out = write_report(run, tmp_path / "card.md")
    text = out.read_text()
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    train = json.loads((project / "metrics" / "train.json").read_text())
    config = json.loads((project / "models" / "config.json").read_text())
    assert f"loss {evaluation['val_loss']:.4f} nats per token" in text
    assert f"{evaluation['bits_per_byte']:.3f} bits per byte" in text
    assert f"{train['parameters']:,} parameters" in text
    assert f"trained on {config['training']['device']}" in text
    assert f"{config['training']['step']:,} steps of" in text
    head = re.search(r"commit `(\w+)`", text)[1]
    assert run.commit.startswith(head) and len(head) == 12
    # The first sample of samples.md, whole, and every figure beside the report.
    samples = (project / "samples" / "samples.md").read_text()
    block = re.search(r"## A sample\n\n(```text\n.*?\n```)\n", text, re.DOTALL)[1]
    assert block in samples
    for figure in FIGURES:
        assert f"![{figure}](card-{figure})" in text
        assert ((tmp_path / f"card-{figure}").read_bytes()
                == (project / "plots" / figure).read_bytes())


def test_a_changed_workspace_is_reported_dirty_with_the_params_the_run_had(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    before = render(workspace_record(project), "")
    assert "- gpt, 2 layers, 2 heads, 32 wide" in before  # the pipeline's tiny model
    change_params(project, {"model.n_layer": 6, "seed": 7})  # edited, not run
    run = workspace_record(project)
    assert run.dirty
    after = render(run, "")
    assert "(with uncommitted changes)" in after
    # The report describes the run as dvc.lock recorded it, not the params edited since.
    assert after.replace(" (with uncommitted changes)", "") == before


def test_a_workspace_without_outputs_is_one_line_naming_the_file(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    (project / "metrics" / "eval.json").unlink()
    with pytest.raises(GptlabError, match=r"metrics/eval.json: not found \(run `dvc repro` "
                                          r"first\)$"):
        workspace_record(project)


def test_an_unknown_experiment_is_one_line(pipeline):
    with pytest.raises(GptlabError, match=r"^--exp: no finished experiment 'nope' "
                                          r"\(experiments: none\)$"):
        experiment_record("nope", pipeline[0])


def test_downstream_scores_get_a_section_only_when_the_run_has_some():
    metrics = {"val_loss": 1.9, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.2625,
               "hellaswag_items": 1000, "hellaswag_skipped": 0, "lambada_acc": 0.01,
               "lambada_perplexity": 5123.456, "lambada_items": 200, "lambada_skipped": 3}
    assert downstream(metrics, 0) == [
        "## Downstream tasks (0-shot, scored as lm-evaluation-harness does)", "",
        "- hellaswag: acc_norm 0.2625, acc 0.2500 (1,000 items)",
        "- lambada: acc 0.0100, perplexity 5123.46 (200 items, 3 the tokenizer cannot encode left "
        "out)", ""]
    assert downstream({"val_loss": 1.9}, 0) == []
