"""Generation: the cached loop against an uncached reference, the sampling filters, end of text,
prompts, the sample stage end to end, and the `gptlab sample` and `chat` commands."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    make_corpus,
    model_config,
    one_error_line,
    paths_in,
    run_params,
    run_stage,
    write_params,
    write_tokens,
)
from torch import nn

from gptlab import generate as gptlab_generate
from gptlab.device import cpu_has_native_bf16
from gptlab.errors import GptlabError
from gptlab.generate import (
    EOT_CHECK_EVERY,
    code_span,
    encode_prompt,
    fenced,
    generate,
    load_for_generation,
    next_tokens,
    prepare_to_generate,
)
from gptlab.model import Bigram, PrepackedLinear, build_model
from gptlab.published import load_published
from gptlab.tokenizers import CharTokenizer
from gptlab.train import train

VOCAB = 65
BLOCK = 16
SAMPLED = dict(temperature=1.0, top_k=None, top_p=1.0, greedy=False)
GREEDY = dict(SAMPLED, greedy=True)
PROMPT = [3, 1, 4, 1, 5]


def peaked_gpt(pos: str = "learned") -> nn.Module:
    """A random GPT whose logits are far apart and whose attention depends on position and
    content, so that any slip of the cache or the window changes the tokens."""
    torch.manual_seed(0)
    model = build_model(model_config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                                     block_size=BLOCK, pos=pos))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                # Three times unit gain makes attention sharp and the next token depend on
                # the context; at GPT's init a random model repeats one token forever.
                std = 0.3 if "emb" in name else 3 * param.size(1) ** -0.5
                param.normal_(std=std)
    return model.eval()


def run(model, prompt=PROMPT, *, num_samples=3, max_new_tokens=20, seed=0, eot_id=None,
        **sampling) -> list[list[int]]:
    return generate(model, prompt, num_samples=num_samples, max_new_tokens=max_new_tokens,
                    eot_id=eot_id, generator=torch.Generator().manual_seed(seed),
                    **(sampling or SAMPLED))


def reference_generate(model, prompt, *, num_samples, max_new_tokens, seed, refill=None,
                       **sampling):
    """Without a cache: the whole window through the model for every token, the window
    restarting from its last `refill` tokens when full: block_size // 2 as generate's does;
    block_size slides it one token at a time, as nanoGPT does."""
    block_size = model.config.block_size
    refill = refill or block_size // 2
    generator = torch.Generator().manual_seed(seed)
    window = torch.tensor([prompt[-block_size:]] * num_samples)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(window)
            token = next_tokens(logits[:, -1], generator=generator, **sampling)
            new.append(token)
            window = torch.cat([window, token[:, None]], dim=1)
            if window.size(1) > block_size:
                window = window[:, -refill:]
    return torch.stack(new, dim=1).tolist()


# --- the cached loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("max_new_tokens", [8, 60], ids=["within-block", "beyond-block"])
def test_cached_generation_matches_uncached_reference(pos, sampling, max_new_tokens):
    model = peaked_gpt(pos)
    cached = run(model, max_new_tokens=max_new_tokens, seed=7, **sampling)
    expected = reference_generate(model, PROMPT, num_samples=3, max_new_tokens=max_new_tokens,
                                  seed=7, **sampling)
    assert cached == expected
    assert all(len(sample) == max_new_tokens for sample in cached)


def test_the_window_policy_changes_the_tokens():
    # Otherwise the comparison above could not tell a wrong window from a right one.
    model = peaked_gpt()
    jumps = reference_generate(model, PROMPT, num_samples=1, max_new_tokens=60, seed=0, **GREEDY)
    slides = reference_generate(model, PROMPT, num_samples=1, max_new_tokens=60, seed=0,
                                refill=BLOCK, **GREEDY)
    assert len(set(jumps[0])) > 10  # not one token repeated
    assert jumps[0][: BLOCK - len(PROMPT) + 1] == slides[0][: BLOCK - len(PROMPT) + 1]
    assert jumps != slides


def test_a_prompt_longer_than_the_block_is_cropped_to_its_end():
    model = peaked_gpt("rope")
    long_prompt = list(range(40))
    assert run(model, long_prompt, **GREEDY) == run(model, long_prompt[-BLOCK:], **GREEDY)


def test_an_empty_prompt_starts_from_the_end_of_text_token_or_is_refused():
    model = peaked_gpt()
    assert run(model, [], eot_id=0, seed=1) == run(model, [0], eot_id=0, seed=1)
    with pytest.raises(GptlabError, match="empty prompt"):
        run(model, [])


def test_the_model_is_left_in_eval_mode_without_gradients():
    model = peaked_gpt().train()
    run(model)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


# --- sampling ----------------------------------------------------------------------------------


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = peaked_gpt()
    assert run(model, seed=1) == run(model, seed=1)
    assert run(model, seed=1) != run(model, seed=2)
    samples = run(model, seed=1)
    assert samples[0] != samples[1]  # one batch, yet independent samples


@pytest.mark.parametrize("narrowing", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)],
                         ids=["top_k=1", "tiny top_p", "tiny temperature"])
def test_narrowed_sampling_equals_greedy(narrowing):
    model = peaked_gpt()
    assert run(model, seed=3, **{**SAMPLED, **narrowing}) == run(model, **GREEDY)


def fixed_distribution_bigram(probs: list[float]) -> Bigram:
    """A bigram whose next token is drawn from `probs` whatever the current token."""
    model = build_model(model_config(vocab_size=len(probs), arch="bigram", block_size=BLOCK))
    with torch.no_grad():
        model.logits_table.weight.copy_(torch.tensor(probs).log().expand(len(probs), -1))
    return model


@pytest.mark.parametrize(("filtering", "allowed"),
                         [(dict(top_k=2), {0, 1}), (dict(top_p=0.55), {0, 1}),
                          (dict(top_k=3, top_p=0.7), {0, 1}), (dict(top_k=10), set(range(6)))])
def test_top_k_and_top_p_limit_the_tokens_drawn(filtering, allowed):
    model = fixed_distribution_bigram([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    samples = run(model, [0], num_samples=40, max_new_tokens=25, **{**SAMPLED, **filtering})
    assert {token for sample in samples for token in sample} == allowed


def test_padding_ids_are_never_drawn():
    model = peaked_gpt()
    assert model.config.padded_vocab_size > VOCAB
    samples = run(model, num_samples=4, max_new_tokens=50, **{**SAMPLED, "temperature": 20.0})
    assert max(token for sample in samples for token in sample) < VOCAB


# --- end of text -------------------------------------------------------------------------------

EOT = 7


def chain_bigram(next_token: dict[int, list[int]]) -> Bigram:
    """A bigram that goes from token a to one of next_token[a], equally likely; every token not
    listed goes to EOT."""
    model = build_model(model_config(vocab_size=8, arch="bigram", block_size=BLOCK))
    table = torch.full((8, 8), -1e4)
    table[:, EOT] = 0.0
    for token, successors in next_token.items():
        table[token] = -1e4
        table[token, successors] = 0.0
    with torch.no_grad():
        model.logits_table.weight.copy_(table)
    return model


def test_generation_stops_at_end_of_text_and_leaves_it_out():
    model = chain_bigram({0: [1], 1: [2], 2: [3]})
    calls = []
    model.register_forward_hook(lambda *_: calls.append("prompt"))
    step = model.decode_step
    model.decode_step = lambda *args: calls.append("token") or step(*args)
    assert run(model, [0], max_new_tokens=1000, eot_id=EOT, **GREEDY) == [[1, 2, 3]] * 3
    # The batch stopped at the first check after every sample had: checking every token would
    # wait for the device each time.
    assert calls == ["prompt"] + ["token"] * (EOT_CHECK_EVERY - 1)


def test_a_finished_sample_waits_while_the_others_go_on():
    model = chain_bigram({0: [1, EOT], 1: [1]})
    samples = run(model, [0], num_samples=16, max_new_tokens=30, eot_id=EOT, seed=5)
    assert {tuple(sample) for sample in samples} == {(), (1,) * 30}
    assert run(model, [0], max_new_tokens=30, **GREEDY)[0][:2] == [1, 1]  # no eot_id: no stop


# --- prompts ---------------------------------------------------------------------------------


def test_a_prompt_outside_the_char_vocabulary_is_named():
    tokenizer = CharTokenizer("abc \n")
    assert encode_prompt(tokenizer, "a cab", "sample.prompts[0]") == [2, 1, 4, 2, 3]
    with pytest.raises(GptlabError, match=r"sample\.prompts\[1\]: character 'é' \(U\+00E9\)"):
        encode_prompt(tokenizer, "abé", "sample.prompts[1]")
    with pytest.raises(GptlabError, match=r"sample\.prompts\[2\]: empty prompt"):
        encode_prompt(tokenizer, "", "sample.prompts[2]")


# --- the stage and the command line ------------------------------------------------------------

SAMPLE_PARAMS = {"sample.device": "cpu", "sample.prompts": ["\n", "the king"],
                 "sample.num_samples": 2, "sample.max_new_tokens": 30, "sample.temperature": 0.8,
                 "sample.top_k": 200, "sample.top_p": 1.0, "sample.greedy": False,
                 "sample.seed": 1337}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A tiny char model trained for a few steps, as the train stage publishes it."""
    folder = tmp_path_factory.mktemp("trained")
    tokens_dir = write_tokens(folder, make_corpus(20_000))
    train(run_params(train_overrides={"max_iters": 10, "eval_interval": 10, "eval_iters": 1,
                                      "checkpoint_interval": 10}), paths_in(folder, tokens_dir))
    return folder / "models"


def sample_project(folder: Path, models_dir: Path, params_for, overrides=None) -> Path:
    shutil.copytree(models_dir, folder / "models")
    write_params(folder, params_for({**SAMPLE_PARAMS, **(overrides or {})}))
    return folder


@pytest.mark.slow
def test_stage_writes_samples_and_metrics_the_same_every_run(tmp_path, models_dir, params_for):
    project = sample_project(tmp_path, models_dir, params_for)
    first = run_stage("sample", project)
    assert first.returncode == 0, first.stderr
    markdown = (project / "samples" / "samples.md").read_text()
    assert '## Prompt 1: `"\\n"`' in markdown and '## Prompt 2: `"the king"`' in markdown
    assert "temperature 0.8, top_k 200, top_p 1.0, seed 1337, max_new_tokens 30" in markdown
    assert "2 layers, 2 heads, 32 wide" in markdown
    assert markdown.count("```text\nthe king") == 2
    metrics = json.loads((project / "metrics" / "sample.json").read_text())
    assert metrics["tokens_per_sec"] > 0 and metrics["samples"] == 4
    assert metrics["generated_tokens"] == 4 * 30  # a char tokenizer has no end-of-text token
    assert run_stage("sample", project).returncode == 0
    assert (project / "samples" / "samples.md").read_text() == markdown


@pytest.mark.slow
def test_stage_notes_a_prompt_it_cannot_encode_and_samples_the_rest(tmp_path, models_dir,
                                                                    params_for):
    """Capitals after clean.lowercase, say: the trained model is not lost to its prompts."""
    project = sample_project(tmp_path, models_dir, params_for,
                             {"sample.prompts": ["the", "thé"]})
    result = run_stage("sample", project)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("note: 1 prompt(s) skipped, which the model's vocabulary "
                                     "cannot encode: see samples/samples.md")
    markdown = (project / "samples" / "samples.md").read_text()
    assert "Skipped: sample.prompts[1]: character 'é' (U+00E9)" in markdown
    assert markdown.count("```text\nthe") == 2
    metrics = json.loads((project / "metrics" / "sample.json").read_text())
    assert metrics["samples"] == 2 and metrics["skipped_prompts"] == 1


def gptlab(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_sample_prints_the_continuation(tmp_path, models_dir):
    result = gptlab("sample", "--prompt", "the king", "--greedy", "--max-new-tokens", "20",
                    "--models", str(models_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sample, separator = result.stdout.rsplit("\n", 2)[:2]
    assert sample.startswith("the king") and len(sample) == len("the king") + 20
    assert separator == "-" * 15


@pytest.mark.slow
def test_cli_sample_takes_its_defaults_from_params_yaml_here(tmp_path, models_dir, params_for):
    write_params(tmp_path, params_for({**SAMPLE_PARAMS, "sample.prompts": ["the"],
                                       "sample.num_samples": 1, "sample.max_new_tokens": 7}))
    result = gptlab("sample", "--models", str(models_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the") and len(result.stdout) == 3 + 7 + 1 + 15 + 1


@pytest.mark.parametrize(("options", "named"),
                         [(["--temperature", "0"], "--temperature"),
                          (["--top-p", "1.5"], "--top-p"), (["--top-k", "0"], "--top-k"),
                          (["--prompt", "é"], "--prompt[0]: character 'é'")])
@pytest.mark.slow
def test_cli_sample_refuses_bad_options_in_one_line(tmp_path, models_dir, options, named):
    result = gptlab("sample", *options, "--models", str(models_dir), cwd=tmp_path)
    assert named in one_error_line(result)


@pytest.mark.slow
def test_cli_chat_continues_each_line_until_quit(tmp_path, models_dir):
    result = gptlab("chat", "--max-new-tokens", "15", "--models", str(models_dir), cwd=tmp_path,
                    stdin="the king\n\nqueen\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr
    # Two replies (the blank line is skipped, /quit ends), each 15 characters and a newline.
    assert len(result.stdout) == 2 * (15 + 1)


def greedy_tokens(model: nn.Module, count: int = 6) -> list[int]:
    [tokens] = generate(model, [1, 2], num_samples=1, max_new_tokens=count, temperature=1.0,
                        top_k=None, top_p=1.0, greedy=True, eot_id=None,
                        generator=torch.Generator().manual_seed(0))
    return tokens


def threads_seen(model: nn.Module) -> tuple[set[int], list[int]]:
    """The thread counts the model ran with while generating, and what it generated."""
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(torch.get_num_threads()))
    tokens = greedy_tokens(model)
    hook.remove()
    return set(seen), tokens


def test_a_small_model_generates_on_one_thread_a_large_one_on_every_core_alike(monkeypatch):
    model = build_model(model_config(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small, tokens = threads_seen(model)
        assert small == {1} and torch.get_num_threads() == 2  # restored afterwards
        # The same model counted as large: every core, the same tokens.
        monkeypatch.setattr("gptlab.generate.THREADED_FROM_PARAMS", model.num_params())
        large, same_tokens = threads_seen(model)
        assert large == {2} and same_tokens == tokens
    finally:
        torch.set_num_threads(before)


def test_a_large_float32_model_on_cpu_generates_through_prepacked_products_alike(monkeypatch):
    model = build_model(model_config(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8))
    reference = copy.deepcopy(model).eval()
    monkeypatch.setattr("gptlab.generate.THREADED_FROM_PARAMS", model.num_params())
    plain = copy.deepcopy(model)
    with monkeypatch.context() as without:  # a torch build without oneDNN's operators
        without.setattr("gptlab.generate.can_prepack", lambda: False)
        assert not any(isinstance(m, PrepackedLinear)
                       for m in prepare_to_generate(plain, torch.float32).modules())
    assert prepare_to_generate(model, torch.float32) is model
    assert any(isinstance(m, PrepackedLinear) for m in model.modules())
    assert greedy_tokens(model, 20) == greedy_tokens(reference, 20)
    # Still a large model once its packed weights are no longer parameters: every core.
    assert model.num_params() < gptlab_generate.THREADED_FROM_PARAMS
    assert threads_seen(model)[0] == {torch.get_num_threads()}


def test_a_model_loaded_for_generation_has_its_weights_cast_once_and_runs_in_their_dtype(
        models_dir):
    reference = load_published(models_dir).model
    model = load_for_generation(models_dir, torch.device("cpu"), "bfloat16", "sample.dtype").model
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.new_cache(2).keys[0].dtype == torch.bfloat16  # no step converts the cache
    autocast_seen = []
    model.register_forward_pre_hook(
        lambda m, args: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert len(greedy_tokens(model, 40)) == 40
    assert autocast_seen and not any(autocast_seen)  # the weights' dtype, not autocast's
    # bf16 weights compute what float32 ones do, to bf16's 8 bits of mantissa.
    with torch.inference_mode():
        ours = model(prompt)[0].float()
        theirs = reference(prompt)[0]
    assert torch.allclose(ours, theirs, atol=0.1 * theirs.abs().max().item())
    # auto is float32 on a CPU without native bf16, and then casts nothing.
    again = load_for_generation(models_dir, torch.device("cpu"), "auto", "sample.dtype")
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert {p.dtype for p in again.model.parameters()} == {expected}


def test_markdown_code_survives_backticks_in_the_text():
    assert code_span('"plain"') == '`"plain"`'
    assert code_span("a `b` c") == "`` a `b` c ``"
    block = fenced("x\n```\ny")
    assert block.startswith("````text\n") and block.endswith("\n````")


@pytest.mark.slow
def test_cli_help_speaks_of_the_product_only(tmp_path):
    for args in (["--help"], ["sample", "--help"], ["chat", "--help"], ["serve", "--help"],
                 ["compare", "--help"], ["scaling", "--help"], ["report", "--help"]):
        result = gptlab(*args, cwd=tmp_path)
        assert result.returncode == 0
        assert not re.search(r"\b[A-Z]+_[A-Z_]+\b|\w+\(\)", result.stdout), result.stdout
