"""The one-line error guard every entry point runs under."""

from __future__ import annotations

import pytest
from helpers import one_error_line, run_stage, write_params

from gptlab.errors import GptlabError, run_main


def refuse() -> None:
    raise GptlabError("params.yaml: model.n_head: 3 does not divide 128")


def test_a_known_error_is_one_line_and_exit_code_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(refuse)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: params.yaml: model.n_head: 3 does not divide 128\n"


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_main(interrupted)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_gptlab_debug_shows_the_traceback(tmp_path, params_for):
    write_params(tmp_path, params_for({"clean.split": "random"}))
    assert "clean.split" in one_error_line(run_stage("clean", tmp_path))
    debug = run_stage("clean", tmp_path, env={"GPTLAB_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "GptlabError" in debug.stderr
