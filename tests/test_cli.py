"""The `gptlab` command's first minutes: outside a project it says so in one line, and its
built-in sampling settings are the project's defaults."""

from __future__ import annotations

import pytest
from helpers import ROOT, gptlab, one_error_line

from gptlab.cli import BUILTIN_SAMPLE, SAMPLING_DEFAULTS, require_project
from gptlab.errors import GptlabError
from gptlab.params import load_params


@pytest.mark.parametrize("command", [
    ["sample"], ["chat"], ["serve"], ["report"], ["report", "--exp", "exp-a"], ["compare"],
    ["scaling"], ["recover"], ["params"], ["params", "--comments"],
])
def test_a_project_command_outside_a_project_says_so(tmp_path, command):
    result = gptlab(tmp_path, *command)
    assert one_error_line(result) == (f"error: not a gptlab project (no dvc.yaml here or "
                                      f"above): {tmp_path}")


@pytest.mark.parametrize("command", [
    ["sample", "--models", "elsewhere"], ["params", "other.yaml"], ["tokens", "train.bin"],
])
def test_commands_given_their_files_run_anywhere(tmp_path, command):
    # They fail on the missing file they were given, not on the folder they run in.
    assert "not a gptlab project" not in one_error_line(gptlab(tmp_path, *command))


def test_a_folder_inside_a_project_is_in_the_project(tmp_path):
    require_project(ROOT / "src" / "gptlab")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    require_project(tmp_path / "a" / "b")
    with pytest.raises(GptlabError, match="not a gptlab project"):
        require_project(tmp_path.parent)


def test_the_builtin_sampling_settings_are_the_projects_defaults():
    shipped = load_params(ROOT / "params.yaml").sample
    assert shipped.model_copy(update={"prompts": ["\n"], "num_samples": 1}) == BUILTIN_SAMPLE
    assert (f"one sample of {shipped.max_new_tokens} tokens after a newline, temperature "
            f"{shipped.temperature}, top_k {shipped.top_k}, seed {shipped.seed}"
            in SAMPLING_DEFAULTS)
