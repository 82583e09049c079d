"""`gptlab serve` under load: concurrent streaming clients for a while, every request timed.

`python -m gptlab.bench.serving` measures the model in models/ alone (`make bench` runs it among
the rest); without one, an untrained model of params.yaml's shape, which generates as fast.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLIENTS = 16
SECONDS = 30.0
MAX_TOKENS = 128


@dataclass
class LoadFigures:
    """What the clients saw: each request completed (its [DONE] arrived), was refused with
    503, or failed in another way (a status, an exception, an unfinished stream)."""

    completed: int = 0
    refused: int = 0
    failed: list[str] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)  # of the completed requests
    tokens: int = 0
    seconds: float = 0.0
    hung: int = 0  # clients still waiting when the test ended

    def summary(self) -> str:
        ttft = sorted(self.first_token_s)
        return (f"{self.completed} completed, {self.refused} refused (503), "
                f"{len(self.failed)} failed, {self.hung} hung; time to first token p50 "
                f"{percentile(ttft, 50) * 1000:,.0f} ms, p99 {percentile(ttft, 99) * 1000:,.0f} "
                f"ms; {self.tokens / self.seconds:,.0f} tokens/s in all")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted values (nan for none)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def load_test(port: int, *, clients: int, seconds: float, max_tokens: int, prompt: str = "\n",
              timeout: float = 30.0) -> LoadFigures:
    """`clients` threads streaming completions from 127.0.0.1:port, one request after another
    until `seconds` have passed; a refused one waits its Retry-After before the next."""
    figures = LoadFigures()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        while time.monotonic() < deadline:
            body = {"prompt": prompt, "max_tokens": max_tokens, "seed": number, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                outcome = stream_once(port, body, timeout)
            except (OSError, http.client.HTTPException, ValueError) as error:
                outcome = f"{type(error).__name__}: {error}"
            with lock:
                record(figures, outcome)
            if isinstance(outcome, int):  # refused: wait as the server asks
                time.sleep(min(outcome, max(0.0, deadline - time.monotonic())))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + timeout + 5 - time.monotonic()))
    figures.hung = sum(thread.is_alive() for thread in threads)
    figures.seconds = time.monotonic() - started
    return figures


def record(figures: LoadFigures, outcome: tuple[float, int] | int | str) -> None:
    if isinstance(outcome, tuple):
        figures.completed += 1
        figures.first_token_s.append(outcome[0])
        figures.tokens += outcome[1]
    elif isinstance(outcome, int):
        figures.refused += 1
    else:
        figures.failed.append(outcome)


def stream_once(port: int, body: dict, timeout: float) -> tuple[float, int] | int | str:
    """One streamed completion: (time to first token, tokens) when it completes, the seconds
    of Retry-After when refused with 503, else what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = time.monotonic()
        connection.request("POST", "/v1/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status == 503:
            return int(response.getheader("Retry-After", "1"))
        if response.status != 200:
            return f"status {response.status}: {response.read()[:200]!r}"
        first, tokens = None, 0
        for line in response:
            data = line.decode().removeprefix("data: ").strip()
            if data == "[DONE]":
                return (first if first is not None else time.monotonic() - sent), tokens
            if not data:
                continue
            chunk = json.loads(data)
            if first is None and any(choice["text"] for choice in chunk["choices"]):
                first = time.monotonic() - sent
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
        return "the stream ended before [DONE]"
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(models_dir: Path, port: int, *options: str) -> subprocess.Popen:
    """`gptlab serve` in a process of its own (the clients' threads must not share its GIL),
    once it answers /health."""
    server = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", "--models",
                               str(models_dir), "--port", str(port), "--device", "cpu",
                               *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"gptlab serve failed: {server.stderr.read().decode()}"
                                   ) from None
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("gptlab serve did not answer within a minute")


def untrained_default(folder: Path) -> Path:
    """A models/ folder of params.yaml's model shape with a 65-character vocabulary, untrained:
    as fast to generate from as the trained one."""
    import torch

    from gptlab.model import build_model
    from gptlab.params import ModelConfig, load_params
    from gptlab.published import save_published
    from gptlab.tokenizers import CharTokenizer

    tokenizer = CharTokenizer("".join(map(chr, range(32, 32 + 64))) + "\n")
    tokenizer.save(folder / "tokenizer.json")
    config = ModelConfig(**{**load_params().model.model_dump(exclude={"init"}),
                            "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    save_published(build_model(config), config, folder / "tokenizer.json", {"step": 0,
                   "val_loss": None}, folder / "models")
    return folder / "models"


def bench_serving(models_dir: Path) -> None:
    """CLIENTS streaming clients for SECONDS against `gptlab serve` with its default limits."""
    with tempfile.TemporaryDirectory() as tmp:
        if (models_dir / "model.safetensors").exists():
            which = str(models_dir)
        else:
            models_dir, which = untrained_default(Path(tmp)), "params.yaml's model, untrained"
        print(f"\nserve ({which}; {CLIENTS} streaming clients for {SECONDS:.0f} s, "
              f"{MAX_TOKENS} tokens each, default limits: 2 generating, 16 waiting)")
        port = free_port()
        server = start_server(models_dir, port)
        try:
            figures = load_test(port, clients=CLIENTS, seconds=SECONDS, max_tokens=MAX_TOKENS)
        finally:
            server.terminate()
            server.wait()
    print(f"  {figures.summary()}")
    for problem in sorted(set(figures.failed))[:3]:
        print(f"  failed: {problem}")


if __name__ == "__main__":
    from gptlab.device import cpu_model_name

    print(f"machine: {cpu_model_name()}, {os.cpu_count()} cores")
    bench_serving(Path("models"))
