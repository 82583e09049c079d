"""GPT-2 (124M)'s shape on this machine: generation and fine-tuning steps of gptlab beside
transformers on the same random weights, each figure a fraction of the machine's limit.

    python -m gptlab.bench.gpt2_cpu                      # the table (`make bench` prints it)
    python -m gptlab.bench.gpt2_cpu generate IMPL BATCH DTYPE
    python -m gptlab.bench.gpt2_cpu step IMPL RANK       # RANK 0 trains every weight

Each figure comes from a process of its own (the second form prints it as JSON), so that its
peak memory is its own. The vocabulary is characters, as a fine-tune of the default corpus
has: the weights read per token are the 12 blocks' (85M parameters, 340 MB in float32), not a
50K-token table. transformers gets gptlab's weights through `gptlab export`'s own conversion.

The limits are measured in the same sitting: memory read bandwidth (a sum over a buffer far
larger than the caches) bounds generation at batch 1, which reads every weight per token;
matrix-product throughput (a large `torch.mm`) bounds a batch of 8 and the training steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gptlab.device import DTYPES, cpu_has_native_bf16, peak_memory_mb
from gptlab.export import gpt2_weights, hf_config
from gptlab.generate import generate_steps, prepare_to_generate
from gptlab.lora import add_adapters
from gptlab.model import GPT
from gptlab.optim import make_optimizer
from gptlab.params import LoraParams, ModelConfig, TrainParams, default_values

VOCAB = 65  # tinyshakespeare's characters
PROMPT_TOKENS, NEW_TOKENS = 512, 256
BATCHES = (1, 8)
STEP_TOKENS = 1024  # batch 1 x GPT-2's block
LORA_RANK = 8
# lora.targets' default (attention's two projections) under GPT-2's names, for PEFT.
PEFT_TARGETS = r".*\.attn\.(c_attn|c_proj)"
IMPLS = ("gptlab", "transformers")


def gpt2_config(**changes: Any) -> ModelConfig:
    return ModelConfig.from_name("gpt2", **{"vocab_size": VOCAB, **changes})


def gptlab_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def transformers_model(model: GPT, config: ModelConfig) -> nn.Module:
    """transformers' GPT2LMHeadModel holding `model`'s weights, converted as `gptlab export`
    converts them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config(config, "gpt2", None)))
    missing, unexpected = hf.load_state_dict(gpt2_weights(model, config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


# --- the machine's limits ---------------------------------------------------------------------

def best_seconds(work: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second that summing a float32 buffer of `gib` GiB reads, on every core."""
    buffer = torch.ones(int(gib * 2**30) // 4)
    return buffer.numel() * 4 / best_seconds(buffer.sum, 5)


def matmul_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a square torch.mm in `dtype`, on every core; a small one first, so that an
    emulated dtype (bf16 without AVX512-BF16 or AMX) is measured in seconds, not minutes."""
    size = 512
    while True:
        a, b = (torch.randn(size, size).to(dtype) for _ in range(2))
        seconds = best_seconds(lambda a=a, b=b: a @ b, 3)
        if seconds > 0.2 or size >= 4096:
            return 2 * size**3 / seconds
        size *= 2


# --- one figure, in a process of its own ------------------------------------------------------

@dataclass(frozen=True)
class Generated:
    tokens: list[list[int]]  # each sample's new tokens
    prefill_seconds: float  # the prompt's pass and the first token
    seconds: float  # all of it


def generation_figures(config: ModelConfig, impl: str, batch: int, dtype: torch.dtype,
                       prompt_tokens: int = PROMPT_TOKENS,
                       new_tokens: int = NEW_TOKENS) -> tuple[Generated, dict[str, float]]:
    """Greedy generation of new_tokens after a random prompt, `batch` samples at once."""
    model = gptlab_model(config)
    if impl == "transformers":
        model = transformers_model(model, config).eval().to(dtype)
    else:
        prepare_to_generate(model, dtype)
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    run = generate_gptlab if impl == "gptlab" else generate_transformers
    generated = run(model, prompt, batch, new_tokens)
    decode_seconds = generated.seconds - generated.prefill_seconds
    return generated, {
        "tokens_per_sec": batch * new_tokens / generated.seconds,
        "decode_tokens_per_sec": batch * (new_tokens - 1) / decode_seconds,
        "prefill_seconds": generated.prefill_seconds,
        "peak_mb": peak_memory_mb(torch.device("cpu")),
    }


def generate_gptlab(model: GPT, prompt: list[int], batch: int, new_tokens: int) -> Generated:
    steps = generate_steps(model, prompt, num_samples=batch, max_new_tokens=new_tokens,
                           temperature=1.0, top_k=None, top_p=1.0, greedy=True, eot_id=None,
                           generator=torch.Generator())
    started = time.perf_counter()
    columns = [next(steps)]
    prefill = time.perf_counter() - started
    columns += list(steps)
    seconds = time.perf_counter() - started
    return Generated(torch.stack(columns, dim=1).tolist(), prefill, seconds)


@torch.inference_mode()
def generate_transformers(model: nn.Module, prompt: list[int], batch: int,
                          new_tokens: int) -> Generated:
    """transformers' generate(); its prefill timed as a generation of one token."""
    ids = torch.tensor([prompt] * batch)

    def run(count: int) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                             min_new_tokens=count, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started, out

    prefill, _ = run(1)
    seconds, out = run(new_tokens)
    return Generated(out[:, len(prompt):].tolist(), prefill, seconds)


def step_figures(config: ModelConfig, impl: str, rank: int,
                 tokens: int = STEP_TOKENS, steps: int = 3) -> dict[str, float]:
    """A training step (forward, backward, AdamW) on one row of `tokens` tokens, every weight
    (rank 0) or LoRA adapters of that rank; the best of `steps` after a first one."""
    model = gptlab_model(config).train()
    # AdamW on both sides, whatever optimizer training defaults to.
    train = TrainParams.model_validate({**default_values(TrainParams), "optimizer": "adamw"})
    lora = LoraParams.model_validate({**default_values(LoraParams), "rank": rank})
    if impl == "gptlab":
        if rank:
            add_adapters(model, lora)
        optimizer = make_optimizer(model, train, torch.device("cpu"))

        def loss_of(row: torch.Tensor) -> torch.Tensor:
            return model(row[:, :-1], row[:, 1:])[1]
    else:
        model = transformers_model(model, config).train()
        if rank:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=PEFT_TARGETS, fan_in_fan_out=True))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=train.lr, betas=(train.beta1, train.beta2),
                                      weight_decay=train.weight_decay)

        def loss_of(row: torch.Tensor) -> torch.Tensor:
            return model(input_ids=row[:, :-1], labels=row[:, :-1]).loss
    row = torch.randint(0, config.vocab_size, (1, tokens + 1),
                        generator=torch.Generator().manual_seed(2))

    def step() -> None:
        loss_of(row).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state is made here, not in a timed step
    seconds = best_seconds(step, steps)
    return {"tokens_per_sec": tokens / seconds, "peak_mb": peak_memory_mb(torch.device("cpu")),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measured(*job: str) -> dict[str, float] | None:
    """One job's figures from a process of its own; None when it needs what is not installed."""
    result = subprocess.run([sys.executable, "-m", "gptlab.bench.gpt2_cpu", *job],
                            capture_output=True, text=True)
    if result.returncode == 3:
        return None
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(job)} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def run_job(args: list[str]) -> None:
    """The second form of the command line: one figure as JSON on stdout."""
    kind, impl, *rest = args
    if kind not in ("generate", "step") or impl not in IMPLS:
        sys.exit(f"error: expected generate|step {'|'.join(IMPLS)} ..., not {' '.join(args)}")
    try:
        if kind == "generate":
            _, figures = generation_figures(gpt2_config(), impl, int(rest[0]), DTYPES[rest[1]])
        else:
            figures = step_figures(gpt2_config(), impl, int(rest[0]))
    except ModuleNotFoundError:  # transformers or peft (dev dependencies) not installed
        sys.exit(3)
    print(json.dumps(figures))


# --- the table --------------------------------------------------------------------------------

def bench_gpt2_cpu() -> None:
    """Print the table: each gptlab figure beside transformers' and against its limit."""
    with torch.device("meta"):
        shape = GPT(gpt2_config())
    params, flops_per_token = shape.num_params(), shape.flops_per_token()
    bandwidth = read_bandwidth()
    matmul = {name: matmul_flops(DTYPES[name]) for name in ("float32", "bfloat16")}
    native_bf16 = cpu_has_native_bf16()
    print(f"\nGPT-2 (124M)'s shape, character vocabulary: {params / 1e6:.1f}M parameters read "
          f"per token; gptlab beside transformers on the same weights")
    print(f"  limits: memory read {bandwidth / 1e9:.1f} GB/s; matmul float32 "
          f"{matmul['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {matmul['bfloat16'] / 1e9:.1f} "
          f"GFLOP/s{'' if native_bf16 else ' (emulated: this CPU has no native bf16)'}")
    print(f"  {'':30s}{'gptlab':>11s}{'transformers':>14s}{'ratio':>7s}{'limit':>10s}"
          f"{'of limit':>10s}{'peak MB':>16s}")
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16" and not native_bf16:
            print(f"  generation in bfloat16: skipped, every matrix product would be emulated "
                  f"({matmul['bfloat16'] / 1e9:.1f} GFLOP/s)")
            continue
        for batch in BATCHES:
            # Batch 1 reads every weight per token; a batch of 8 shares each read 8 ways.
            limit = (bandwidth / (params * DTYPES[dtype].itemsize) if batch == 1
                     else matmul[dtype] / (2 * params))
            figures = [measured("generate", impl, str(batch), dtype) for impl in IMPLS]
            print_row(f"generate, batch {batch}, {dtype}", figures, limit, "decode_tokens_per_sec")
    for rank in (0, LORA_RANK):
        # A LoRA step computes no gradients of the frozen weights: about 2/3 of a full step.
        limit = matmul["float32"] / (flops_per_token * (2 / 3 if rank else 1))
        figures = [measured("step", impl, str(rank)) for impl in IMPLS]
        print_row("fine-tune step, " + (f"LoRA rank {rank}" if rank else "every weight"), figures,
                  limit, "tokens_per_sec")
    print("  generation: 512-token prompt, 256 greedy tokens; tokens/s over all of it, the "
          "fraction of the limit from the tokens after the prompt's pass alone; steps: batch 1 "
          "x 1024 tokens, AdamW, float32")


def print_row(what: str, figures: list[dict[str, float] | None], limit: float,
              rate_key: str) -> None:
    ours, theirs = figures
    assert ours is not None
    their_rate = f"{theirs['tokens_per_sec']:14.1f}" if theirs else f"{'(not installed)':>14s}"
    ratio = f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:6.1f}x" if theirs else " " * 7
    peaks = f"{ours['peak_mb']:,.0f}" + (f" / {theirs['peak_mb']:,.0f}" if theirs else "")
    print(f"  {what:30s}{ours['tokens_per_sec']:11.1f}{their_rate}{ratio}{limit:10.1f}"
          f"{ours[rate_key] / limit:10.0%}{peaks:>16s}", flush=True)


def main() -> None:
    if len(sys.argv) > 1:
        run_job(sys.argv[1:])
    else:
        bench_gpt2_cpu()


if __name__ == "__main__":
    main()
