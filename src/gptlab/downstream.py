"""Downstream scores: the published model on the tasks of gptlab.tasks, scored as
lm-evaluation-harness scores a causal language model.

Each (context, continuation) pair is tokenized as the harness does: spaces at the end of the
context move to the continuation, the whole text is encoded, and the continuation is what
follows the context's own encoding. When context plus continuation are longer than the model's
block_size + 1 tokens, the context is cut from the left (the continuation kept whole), as the
harness does with its max_length; a continuation longer than block_size alone, which the
harness refuses, is scored on its last block_size tokens. The score of a continuation is the
sum of its tokens' log-probabilities; it is greedy when every one of its tokens is the model's
most likely. An item whose text the tokenizer cannot encode is left out and counted.

Pairs are scored in batches, longest first (like lengths pad least), one forward pass each.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gptlab.device import autocast
from gptlab.errors import GptlabError
from gptlab.params import EvalParams
from gptlab.published import Published
from gptlab.tasks import TARGET_DELIMITER, TASKS, Item, load_task, render_context, subset
from gptlab.tokenizers import Tokenizer


@dataclass(frozen=True)
class Pair:
    """One continuation to score: the tokens the model reads and how many at the end to score."""

    tokens: list[int]  # context then continuation, at most block_size + 1
    scored: int


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float
    greedy: bool


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int],
                                                                                list[int]]:
    """The harness's tokenization of a pair: the whole text encoded, split where the context's
    own encoding ends (a BPE merge across the boundary stays in the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).tolist()
    context_ids = tokenizer.encode(context).tolist()
    return context_ids, whole[len(context_ids):]


def make_pair(context_ids: list[int], continuation_ids: list[int], block_size: int) -> Pair:
    """The pair cut to the model's window: the last block_size + 1 tokens (the last is only a
    target), so a long context loses its beginning."""
    tokens = (context_ids + continuation_ids)[-(block_size + 1):]
    return Pair(tokens, min(len(continuation_ids), len(tokens) - 1))


@torch.no_grad()
def score_pairs(model: nn.Module, pairs: list[Pair], batch_size: int, device: torch.device,
                dtype: torch.dtype, desc: str) -> list[Loglikelihood]:
    """The log-likelihood of each pair's scored tokens, batch_size pairs per forward pass."""
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].tokens))
    results: list[Loglikelihood | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), unit="pair", desc=desc, disable=None,
              file=sys.stderr) as progress:
        for start in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[start : start + batch_size]]
            for index, result in zip(order[start : start + batch_size],
                                     _score_batch(model, batch, device, dtype), strict=True):
                results[index] = result
            progress.update(len(batch))
    return results  # type: ignore[return-value]  # every index was filled


def _score_batch(model: nn.Module, batch: list[Pair], device: torch.device,
                 dtype: torch.dtype) -> list[Loglikelihood]:
    width = max(len(pair.tokens) for pair in batch) - 1
    # Padding goes on the right, where causal attention keeps it from the tokens scored.
    window = torch.zeros(len(batch), width + 1, dtype=torch.long)
    for row, pair in enumerate(batch):
        window[row, : len(pair.tokens)] = torch.tensor(pair.tokens)
    window = window.to(device)
    with autocast(device, dtype):
        logits, _ = model(window[:, :-1])
    sums, greedy = [], []
    for row, pair in enumerate(batch):
        end = len(pair.tokens) - 1
        # Only the scored positions, in float32: a batch's whole log-softmax would be as large
        # again as its logits.
        logprobs = F.log_softmax(logits[row, end - pair.scored : end].float(), dim=-1)
        targets = window[row, end - pair.scored + 1 : end + 1]
        sums.append(logprobs.gather(-1, targets[:, None]).sum())
        greedy.append((logprobs.argmax(-1) == targets).all())
    # One copy to the host per batch rather than two per pair.
    return [Loglikelihood(logprob, is_greedy) for logprob, is_greedy in
            zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist(), strict=True)]


@dataclass(frozen=True)
class TaskScore:
    """Per-item results of one task: the predictions and what they score."""

    name: str
    indices: list[int]  # the items scored, by their index in the task
    predictions: list[int]  # by summed log-likelihood
    normalised: list[int]  # by log-likelihood per character of the choice
    correct: list[bool]
    correct_norm: list[bool]
    logprobs: list[list[float]]
    skipped: int  # items the tokenizer cannot encode
    seconds: float

    def metrics(self) -> dict[str, Any]:
        """The task's entries for metrics/eval.json (scores None when no item was scored)."""
        scored = len(self.correct)
        metrics: dict[str, Any] = {"acc": _mean(self.correct)}
        if TASKS[self.name].kind == "choice":
            metrics["acc_norm"] = _mean(self.correct_norm)
        else:
            metrics["perplexity"] = self.perplexity()
        metrics.update(items=scored, skipped=self.skipped,
                       items_per_sec=round(scored / self.seconds, 2) if self.seconds else None)
        return {f"{self.name}_{key}": value for key, value in metrics.items()}

    def perplexity(self) -> float | None:
        """The harness's perplexity of a one-choice task: exp(-mean log-likelihood)."""
        if not self.logprobs:
            return None
        mean = sum(lls[0] for lls in self.logprobs) / len(self.logprobs)
        try:
            return round(math.exp(-mean), 4)
        except OverflowError:
            raise GptlabError(f"eval: the {self.name} perplexity is beyond a float (mean "
                              f"log-likelihood {mean:.1f} nats)") from None


def _mean(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 6) if flags else None


def item_pairs(tokenizer: Tokenizer, context: str, item: Item,
               block_size: int) -> list[Pair] | None:
    """The pairs of an item's choices, or None when the tokenizer cannot encode its text (a
    character outside a char tokenizer's vocabulary)."""
    try:
        encoded = [encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
                   for choice in item.choices]
    except GptlabError:
        return None
    return [make_pair(context_ids, continuation_ids, block_size)
            for context_ids, continuation_ids in encoded]


def score_task(published: Published, items: list[Item], name: str, params: EvalParams,
               dtype: torch.dtype) -> TaskScore:
    """Score the subset of `items` that params.task_limit draws."""
    started = time.perf_counter()
    block_size = published.config.model.block_size
    chosen = subset(len(items), params.task_limit, params.task_seed)
    kept: list[int] = []
    pairs: list[Pair] = []
    for index in chosen:
        context = render_context(items, index, params.num_fewshot, params.task_seed)
        encoded = item_pairs(published.tokenizer, context, items[index], block_size)
        if encoded is not None:
            kept.append(index)
            pairs.extend(encoded)
    results = score_pairs(published.model, pairs, params.batch_size, published.device, dtype,
                          name)
    if any(math.isnan(result.logprob) for result in results):
        raise GptlabError(f"eval: {name} log-likelihoods are NaN; with eval.dtype float16 the "
                          f"logits may overflow, so try float32")
    return judge(name, items, kept, results, time.perf_counter() - started,
                  len(chosen) - len(kept))


def judge(name: str, items: list[Item], kept: list[int], results: list[Loglikelihood],
           seconds: float, skipped: int) -> TaskScore:
    """Predictions and correctness of each item from its choices' log-likelihoods."""
    predictions, normalised, correct, correct_norm, logprobs = [], [], [], [], []
    position = 0
    for index in kept:
        item = items[index]
        scores = results[position : position + len(item.choices)]
        position += len(item.choices)
        lls = [score.logprob for score in scores]
        per_char = [ll / len(choice) for ll, choice in zip(lls, item.choices, strict=True)]
        predictions.append(max(range(len(lls)), key=lls.__getitem__))
        normalised.append(max(range(len(lls)), key=per_char.__getitem__))
        if TASKS[name].kind == "word":  # right only if the model would write the word itself
            correct.append(scores[0].greedy)
        else:
            correct.append(predictions[-1] == item.gold)
        correct_norm.append(normalised[-1] == item.gold)
        logprobs.append(lls)
    return TaskScore(name, kept, predictions, normalised, correct, correct_norm, logprobs,
                     skipped, seconds)


def evaluate_tasks(published: Published, wheel: Path, params: EvalParams,
                   dtype: torch.dtype) -> dict[str, Any]:
    """The metrics of every task in params.tasks, in that order; every task is read and
    checked before the first is scored."""
    loaded = {name: load_task(wheel, name) for name in params.tasks}
    for name, items in loaded.items():
        if params.num_fewshot >= len(items):
            raise GptlabError(f"eval.num_fewshot: {params.num_fewshot} examples, but {name} "
                              f"has only {len(items)} items")
    metrics: dict[str, Any] = {}
    for name, items in loaded.items():
        metrics.update(score_task(published, items, name, params, dtype).metrics())
    return metrics
