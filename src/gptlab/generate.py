"""Text generation: continue a prompt with a trained model, several samples as one batch.

`generate` runs the prompt through the model's KV cache once, then feeds one token per step,
so each new token costs one cached step instead of a pass over the whole context (nanoGPT
recomputes its full window for every token). Past block_size tokens the window slides in
jumps: the cache is refilled from the last block_size // 2 tokens, so every token is predicted
from between block_size // 2 and block_size tokens of context. `generate_steps` is the same
loop one step at a time, for a caller that shows tokens as they come (`gptlab serve`).

`sample_prompts` is the sample stage: the published model on each prompt of params.sample,
rendered as Markdown, with the generation speed as metrics.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.device import pick_device, pick_dtype
from gptlab.errors import GptlabError
from gptlab.model import KVCache, PrepackedLinear, can_prepack, prepack_linears
from gptlab.params import SampleParams
from gptlab.published import Published, load_published
from gptlab.tokenizers import Tokenizer

# Generated tokens between checks whether every sample has reached its end-of-text token.
EOT_CHECK_EVERY = 16
# Parameters from which generation on a CPU uses every core. Below, a cached step is about a
# hundred tiny kernels that a second thread only slows with synchronisation, and that collapse
# when another process holds a core (the default model on 2 cores: 2,240 vs 525 tokens/s with
# one busy neighbour). Above, each matrix product is worth sharing (GPT-2 124M on 2 cores: a
# 512-token prompt in 0.7 s instead of 1.5 s).
THREADED_FROM_PARAMS = 10_000_000


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    greedy: bool,
    eot_id: int | None,
    generator: torch.Generator,
) -> list[list[int]]:
    """`num_samples` continuations of one prompt, generated as one batch through the KV cache.

    Each continuation excludes the prompt and stops before its first `eot_id` (when not None);
    the batch stops once every sample has stopped, or after max_new_tokens. The tokens are
    `generate_steps`' for the same arguments: the same generator state gives the same tokens.
    """
    columns = []
    finished = torch.zeros(num_samples, dtype=torch.bool, device=next(model.parameters()).device)
    steps = generate_steps(model, prompt_ids, num_samples=num_samples,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, greedy=greedy, eot_id=eot_id, generator=generator)
    with contextlib.closing(steps):  # stopping early restores the thread count now, not at gc
        for count, new in enumerate(steps, start=1):
            columns.append(new)
            if eot_id is not None:
                finished |= new == eot_id
                # Reading the flags waits for the device: once every few tokens, not every one.
                if count % EOT_CHECK_EVERY == 0 and finished.all():
                    break
    rows = torch.stack(columns, dim=1).tolist()
    return [cut_at_eot(row, eot_id) for row in rows]


@torch.inference_mode()
def generate_steps(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    greedy: bool,
    eot_id: int | None,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """The new token of every sample (num_samples,), one step at a time, for up to
    max_new_tokens steps: what `generate` collects and a server streams. The caller decides
    when to stop (a sample goes on past its end-of-text token).

    A prompt longer than block_size is cropped to its last block_size tokens; an empty one
    starts from the end-of-text token (GPT-2's way to start from nothing), and is an error
    when the tokenizer has none.

    When the cache is full it is refilled from the last block_size // 2 tokens of each sample
    and generation goes on one token at a time: positions restart at 0 in the refilled cache,
    which is right for learned and rotary positions alike since the window is encoded afresh.
    """
    model.eval()
    prompt = start_ids(prompt_ids, eot_id)[-model.config.block_size :]
    device = next(model.parameters()).device
    # Every sample is one row of a rectangle that slides its window all at once.
    tokens = torch.empty(num_samples, len(prompt) + max_new_tokens, dtype=torch.long,
                         device=device)
    tokens[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    pick = functools.partial(next_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy, generator=generator)
    with generation_threads(model, device):
        yield from decode_steps(model, tokens, len(prompt), pick)


def load_for_generation(models_dir: Path, device: torch.device, dtype_name: str,
                        param: str) -> Published:
    """The model published in `models_dir`, on `device`, made ready by `prepare_to_generate`
    in the dtype `dtype_name` picks there (named in errors as params key `param`)."""
    published = load_published(models_dir, device)
    prepare_to_generate(published.model, pick_dtype(dtype_name, device, param))
    return published


def prepare_to_generate(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model in eval mode with its weights in `dtype`, cast once here, where autocast would
    cast every weight again for every token, the very traffic that bounds generation; on a CPU,
    a large float32 model's blocks get oneDNN's prepacked products. It can generate, no longer
    train."""
    model.eval().to(dtype)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and dtype == torch.float32 and is_large(model) and can_prepack():
        prepack_linears(model)
    return model


def is_large(model: nn.Module) -> bool:
    """Whether the model has THREADED_FROM_PARAMS parameters or more; a prepacked one does
    (only those are prepacked), its packed weights no longer being parameters."""
    return (model.num_params() >= THREADED_FROM_PARAMS
            or any(isinstance(module, PrepackedLinear) for module in model.modules()))


@contextlib.contextmanager
def generation_threads(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a model below THREADED_FROM_PARAMS on a single CPU thread, a larger one on every
    core (torch's default)."""
    if device.type != "cpu" or is_large(model):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def start_ids(prompt_ids: list[int], eot_id: int | None) -> list[int]:
    """The prompt, or the end-of-text token when the prompt is empty."""
    if prompt_ids:
        return list(prompt_ids)
    if eot_id is None:
        raise GptlabError('empty prompt, and this tokenizer has no end-of-text token to start '
                          'from; give at least one character, such as "\\n"')
    return [eot_id]


def decode_steps(model: nn.Module, tokens: Tensor, prompt_length: int,
                 pick: Callable[[Tensor], Tensor]) -> Iterator[Tensor]:
    """Write new tokens into tokens[:, prompt_length:] one column at a time, yielding each.

    The cache holds keys and values in the weights' dtype, so no step converts the prefix.
    """
    cache = model.new_cache(tokens.size(0))
    refill_length = max(1, cache.capacity // 2)  # a block_size of 1 still keeps one token
    logits = last_logits(model, tokens[:, :prompt_length], cache)
    for position in range(prompt_length, tokens.size(1)):
        new = pick(logits.float())  # sampled in float32 whatever the compute dtype
        tokens[:, position] = new
        yield new
        if position + 1 == tokens.size(1):
            break
        if cache.length == cache.capacity:  # slide: encode the last refill_length afresh
            cache.reset()
            logits = last_logits(model, tokens[:, position + 1 - refill_length : position + 1],
                                 cache)
        else:  # the common case: one token per row through the lean path
            logits = model.decode_step(new, cache)


def last_logits(model: nn.Module, window: Tensor, cache: KVCache) -> Tensor:
    """The logits after a window of several tokens (a prompt, a refill), through forward()."""
    return model(window, cache=cache)[0][:, -1]


def next_tokens(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float,
                greedy: bool, generator: torch.Generator) -> Tensor:
    """One token id per row of logits (batch, vocab): the argmax, or a draw from the filters."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    # Filters that would keep every token are skipped: top_p's sort costs more than the draw.
    if top_k is not None and top_k < logits.size(-1):
        logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        logits = keep_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    # What torch.multinomial does for one sample (the same draws from the same generator),
    # without its checks of the probabilities, which double the cost of sampling on CPU.
    exponential = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / exponential).argmax(dim=-1)


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest of each row set to -inf (ties at the k-th all stay)."""
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Logits outside the nucleus set to -inf: the most likely tokens whose probability first
    reaches top_p together, so the most likely token always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the more likely tokens before it already reach top_p.
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cut_at_eot(ids: list[int], eot_id: int | None) -> list[int]:
    """The ids before the first end-of-text token."""
    return ids[: ids.index(eot_id)] if eot_id in ids else ids


def encode_prompt(tokenizer: Tokenizer, prompt: str, where: str) -> list[int]:
    """Token ids of a prompt; a problem is reported as being at `where`."""
    try:
        ids = tokenizer.encode(prompt).tolist()
        start_ids(ids, tokenizer.eot_id)  # an empty prompt fails here, named, not in generate
    except GptlabError as error:
        raise GptlabError(f"{where}: {error}") from None
    return ids


@dataclass(frozen=True)
class PromptSamples:
    prompt: str
    continuations: list[str]  # decoded, without the prompt
    new_tokens: int
    seconds: float  # spent in generate alone
    skipped: str | None = None  # why the prompt was not continued, if it was not


def sample_prompt(published: Published, prompt: str, prompt_ids: list[int],
                  params: SampleParams, generator: torch.Generator) -> PromptSamples:
    """params.num_samples continuations of one encoded prompt, timed."""
    started = time.perf_counter()
    continuations = generate(
        published.model, prompt_ids, num_samples=params.num_samples,
        max_new_tokens=params.max_new_tokens, temperature=params.temperature,
        top_k=params.top_k, top_p=params.top_p, greedy=params.greedy,
        eot_id=published.tokenizer.eot_id, generator=generator,
    )
    seconds = time.perf_counter() - started
    return PromptSamples(prompt, [published.tokenizer.decode(ids) for ids in continuations],
                         sum(map(len, continuations)), seconds)


def sample_all(published: Published, params: SampleParams,
               prompts_name: str = "sample.prompts") -> list[PromptSamples]:
    """Every prompt of params continued; each starts from the seed, so its samples do not
    depend on the prompts before it. A bad prompt is named as prompts_name[index]."""
    # All prompts are encoded first, so a bad one fails before any time is spent generating.
    encoded = [encode_prompt(published.tokenizer, prompt, f"{prompts_name}[{index}]")
               for index, prompt in enumerate(params.prompts)]
    return [
        sample_prompt(published, prompt, ids, params,
                      torch.Generator(published.device).manual_seed(params.seed))
        for prompt, ids in zip(params.prompts, encoded, strict=True)
    ]


def sample_prompts(models_dir: Path, params: SampleParams) -> tuple[str, dict[str, Any]]:
    """The sample stage: Markdown of every prompt's samples, and the generation metrics.

    A prompt the model's vocabulary cannot encode (capitals after clean.lowercase, say) is
    skipped with a note on the page, not an error: the stage runs after training, and failing
    here would throw a finished experiment away.
    """
    published = load_for_generation(models_dir, pick_device(params.device, "sample.device"),
                                    params.dtype, "sample.dtype")
    results = [sample_or_skip(published, prompt, f"sample.prompts[{index}]", params)
               for index, prompt in enumerate(params.prompts)]
    new_tokens = sum(result.new_tokens for result in results)
    seconds = sum(result.seconds for result in results)
    metrics = {
        "tokens_per_sec": round(new_tokens / seconds, 1) if seconds else None,
        "generated_tokens": new_tokens,
        "samples": sum(len(result.continuations) for result in results),
        "skipped_prompts": sum(result.skipped is not None for result in results),
    }
    return samples_markdown(published, params, results), metrics


def sample_or_skip(published: Published, prompt: str, where: str,
                   params: SampleParams) -> PromptSamples:
    """One prompt's samples, or why it has none."""
    try:
        ids = encode_prompt(published.tokenizer, prompt, where)
    except GptlabError as error:
        return PromptSamples(prompt, [], 0, 0.0, skipped=str(error))
    generator = torch.Generator(published.device).manual_seed(params.seed)
    return sample_prompt(published, prompt, ids, params, generator)


def samples_markdown(published: Published, params: SampleParams,
                     results: list[PromptSamples]) -> str:
    """The samples page: model, settings, then each prompt's samples in code blocks."""
    lines = ["# Samples", "", f"- model: {model_summary(published)}",
             f"- sampling: {sampling_summary(params)}", ""]
    for number, result in enumerate(results, start=1):
        # JSON quoting shows a prompt's newlines and spaces that a code block would hide.
        lines += [f"## Prompt {number}: {code_span(json.dumps(result.prompt, ensure_ascii=False))}",
                  ""]
        if result.skipped:
            lines += [f"Skipped: {result.skipped}.", ""]
        for sample, continuation in enumerate(result.continuations, start=1):
            lines += [f"### Sample {sample}", "", fenced(result.prompt + continuation), ""]
    return "\n".join(lines)


def model_summary(published: Published) -> str:
    m = published.config.model
    if m.arch == "bigram":
        shape = "bigram"
    else:
        shape = (f"gpt, {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
                 f"{m.pos} positions, {m.norm}, {m.mlp}")
    training = published.config.training
    trained = f"{training['step']} steps" + (
        f", val loss {training['val_loss']:.4f}" if training["val_loss"] is not None else "")
    return (f"{shape}, block {m.block_size}, {published.model.num_params():,} parameters, "
            f"{published.tokenizer.kind} tokenizer ({published.tokenizer.vocab_size} tokens), "
            f"trained {trained}")


def sampling_summary(params: SampleParams) -> str:
    how = ("greedy" if params.greedy else
           f"temperature {params.temperature}, top_k {params.top_k}, top_p {params.top_p}")
    return (f"{how}, seed {params.seed}, max_new_tokens {params.max_new_tokens}, "
            f"{params.num_samples} per prompt")


def fenced(text: str) -> str:
    """A Markdown code block holding text verbatim."""
    fence = backtick_fence(text, shortest=3)
    return f"{fence}text\n{text}\n{fence}"


def code_span(text: str) -> str:
    """Inline Markdown code holding text verbatim, even text with backticks in it."""
    fence = backtick_fence(text, shortest=1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


def backtick_fence(text: str, shortest: int) -> str:
    """A run of backticks longer than any inside text, so the text cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(shortest, longest + 1)
