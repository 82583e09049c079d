"""The one-line error guard every entry point runs under."""

from __future__ import annotations

import pytest
from helpers import one_error_line, run_stage, write_params

from gptlab.errors import GptlabError, note_input, run_main
from gptlab.io import read_text, write_json
from gptlab.params import load_params


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


def test_an_output_is_refused_once_params_yaml_changed_since_it_was_read(
    tmp_path, capsys, params_for
):
    params_yaml = write_params(tmp_path, params_for({"seed": 8}))
    output = tmp_path / "metrics.json"

    def read_then_write() -> None:
        seed = load_params(params_yaml).seed
        write_params(tmp_path, params_for({"seed": 7}))  # as DVC puts the workspace's back
        write_json(output, {"seed": seed})

    with pytest.raises(SystemExit) as exit_info:
        run_main(read_then_write)
    assert exit_info.value.code == 1 and not output.exists()
    assert capsys.readouterr().err == (
        "error: params.yaml: changed while this ran (as it does for a moment when `dvc exp run "
        "--queue` or `--temp` records an experiment), so nothing more is written; run it again\n")
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temporary file left


def test_params_yaml_read_twice_with_different_texts_refuses_outputs(tmp_path, capsys):
    params_yaml = write_params(tmp_path, {"seed": 7})

    def read_twice_then_write() -> None:
        read_text_and_note(params_yaml)
        params_yaml.write_text("seed: 8\n")
        read_text_and_note(params_yaml)
        params_yaml.write_text("seed: 7\n")
        write_json(tmp_path / "out.json", {})

    with pytest.raises(SystemExit):
        run_main(read_twice_then_write)
    assert "changed while this ran" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_unchanged_inputs_and_code_outside_an_entry_point_write_as_usual(tmp_path):
    params_yaml = write_params(tmp_path, {"seed": 7})

    def read_then_write() -> None:
        read_text_and_note(params_yaml)
        write_json(tmp_path / "out.json", {"seed": 7})

    run_main(read_then_write)
    read_text_and_note(params_yaml)  # a library call, as in a notebook: nothing is watched
    params_yaml.write_text("seed: 8\n")
    write_json(tmp_path / "later.json", {})
    assert (tmp_path / "out.json").exists() and (tmp_path / "later.json").exists()


def read_text_and_note(path) -> None:
    note_input(path, read_text(path, missing="a test's params file"))
