"""`gptlab serve`: trained models behind an OpenAI-compatible HTTP API, and a chat page.

    GET  /                     the chat page (one HTML file, nothing loaded from elsewhere)
    GET  /health               liveness, the models, generations running and waiting
    GET  /v1/models            the served models
    POST /v1/completions       continue a prompt
    POST /v1/chat/completions  answer a conversation, rendered as text by its chat template

Both POST endpoints stream server-sent events in the OpenAI chunk format when asked
(`"stream": true`), ending with `data: [DONE]`. Sampling is `gptlab sample`'s: the same seed,
prompt and settings give the same text. Generation runs in worker threads (torch releases the
GIL in its kernels), at most `concurrency` at once with `queue` more waiting; past that a
request gets 503 with Retry-After. A client that goes away stops its generation at the next
token. Every error reaches the client as one line in OpenAI's error format, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from gptlab.chat import END_OF_TURN, ROLES, render
from gptlab.errors import GptlabError
from gptlab.generate import encode_prompt, generate_steps
from gptlab.params import describe
from gptlab.published import Published
from gptlab.tokenizers import Tokenizer, chat_tokens_of

log = logging.getLogger("gptlab.serve")

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8000
# OpenAI's defaults when a request names no max_tokens: 16 for a completion; a chat reply is
# given room for a few sentences.
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 256
MAX_STOPS = 4  # as OpenAI allows
# How often a generation waiting for its next token checks whether its client went away.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many generations run and wait at once."""

    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_prompt_chars: int = 32_000  # a prompt, or the characters of all the messages
    max_tokens: int = 1024
    max_n: int = 8
    concurrency: int = 2
    queue: int = 16
    retry_after_s: int = 1


# --- chat templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes one prompt, and the strings that end the assistant's turn."""

    names: dict[str, str]  # role -> the name written before its turns
    stop: tuple[str, ...]

    def render(self, turns: list[tuple[str, str]]) -> str:
        """Each (role, text) as `Name: text` on a line of its own, then the assistant's name."""
        lines = [f"{self.names[role]}: {text.strip()}\n" for role, text in turns]
        return "".join(lines) + f"{self.names['assistant']}:"


class ModelChatTemplate(ChatTemplate):
    """gptlab's chat template (see gptlab.chat), for models whose tokenizer has its tokens."""

    def render(self, turns: list[tuple[str, str]]) -> str:
        messages = [{"role": role, "content": text} for role, text in turns]
        return render(messages, add_generation_prompt=True)


# For models that record no template of their own: a transcript any model trained on text can
# continue, cut where it starts to write the user's next turn.
PLAIN_CHAT = ChatTemplate({"system": "System", "user": "User", "assistant": "Assistant"},
                          stop=("\nUser:",))
# For models fine-tuned on conversations: the answer ends at the end-of-turn token.
MODEL_CHAT = ModelChatTemplate({role: f"<|{role}|>" for role in ROLES}, stop=(END_OF_TURN,))


def chat_template(published: Published) -> ChatTemplate:
    """The chat template of a model: its own where its tokenizer has the chat tokens, else
    PLAIN_CHAT."""
    return MODEL_CHAT if chat_tokens_of(published.tokenizer) else PLAIN_CHAT


# --- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both POST endpoints take: OpenAI's fields that gptlab's sampling has, and top_k."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the first served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 is greedy decoding
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _few_and_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) > MAX_STOPS or "" in value):
            raise ValueError(f"expected up to {MAX_STOPS} non-empty strings")
        return value


class CompletionRequest(SamplingRequest):
    prompt: str


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class ApiError(Exception):
    """An answer in OpenAI's error format: one message, the parameter it is about."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refused past `limit` bytes before more of it is read."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit:,} bytes",
                         code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})",
                       code="invalid_json") from None


def validated(schema: type[BaseModel], data: Any) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]["loc"]
        raise ApiError(400, describe(error, schema),
                       param=".".join(map(str, first)) or None) from None


# --- what to generate --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One request, checked against the limits and encoded: everything a worker needs."""

    name: str
    published: Published
    prompt_ids: list[int]
    notice: str | None  # set when the prompt was cut to the model's context
    n: int
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int
    stop: tuple[str, ...]


def plan_request(body: SamplingRequest, prompt: str, models: dict[str, Published],
                 limits: Limits, default_tokens: int, stop: tuple[str, ...] = (),
                 where: str = "prompt") -> Plan:
    """The request's plan; `where` names the prompt in a refusal (a conversation's words)."""
    name = body.model or next(iter(models))
    if name not in models:
        raise ApiError(404, f"model {name!r} is not served here (served: "
                            f"{', '.join(models)})", param="model", code="model_not_found")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens: at most {limits.max_tokens} (got {max_tokens})",
                       param="max_tokens")
    if body.n > limits.max_n:
        raise ApiError(400, f"n: at most {limits.max_n} (got {body.n})", param="n")
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"{where}: {len(prompt):,} characters, more than the "
                            f"{limits.max_prompt_chars:,} allowed", param=where.split()[0])
    published = models[name]
    try:
        ids = encode_prompt(published.tokenizer, prompt, where)
    except GptlabError as error:
        raise ApiError(400, str(error), param=where.split()[0]) from None
    ids, notice = fit_context(ids, published.config.model.block_size)
    return Plan(name, published, ids, notice, body.n,
                max_tokens or min(default_tokens, limits.max_tokens), body.temperature,
                body.top_k, body.top_p,
                secrets.randbits(63) if body.seed is None else body.seed,
                tuple(dict.fromkeys([*stop, *(body.stop or [])])))


def fit_context(ids: list[int], context: int) -> tuple[list[int], str | None]:
    """The prompt's last `context` tokens, and a note for the client when that cut some."""
    if len(ids) <= context:
        return ids, None
    cut = len(ids) - context
    return ids[cut:], (f"the prompt is {len(ids)} tokens, longer than the model's context of "
                       f"{context}: its first {cut} tokens were left out")


def chat_prompt(body: ChatRequest, models: dict[str, Published], limits: Limits) -> Plan:
    if len(body.messages) > limits.max_messages:
        raise ApiError(400, f"messages: at most {limits.max_messages} (got "
                            f"{len(body.messages)})", param="messages")
    name = body.model or next(iter(models))
    template = chat_template(models[name]) if name in models else PLAIN_CHAT
    prompt = template.render([(message.role, message.text()) for message in body.messages])
    return plan_request(body, prompt, models, limits, DEFAULT_CHAT_TOKENS, template.stop,
                        "messages (as the chat template writes them)")


# --- generation, in a worker thread --------------------------------------------------------------


@dataclass
class Step:
    """What one generated token changed: new text and finish reasons, by choice index."""

    texts: dict[int, str] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    pass


class ChoiceText:
    """One choice's text as its tokens come: decoded whole (a token can be part of a
    character), cut at its first stop string, released only where it cannot become one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """The text `token` releases (possibly none)."""
        if token == self.tokenizer.eot_id:
            return self.finish("stop")
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        found = [i for i in (self.text.find(stop) for stop in self.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            return self.finish("stop")
        end = len(self.text) - self.held_back()
        new, self.released = self.text[self.released : end], max(self.released, end)
        return new

    def held_back(self) -> int:
        """Characters at the end that may still change: a partly decoded character, or the
        start of a stop string."""
        partial = len(self.text) - len(self.text.rstrip("\ufffd"))
        return max([partial, *(size for stop in self.stop for size in range(1, len(stop))
                               if self.text.endswith(stop[:size]))])

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        new, self.released = self.text[self.released :], len(self.text)
        return new


def run_plan(plan: Plan, cancelled: threading.Event, emit: Callable[[Any], None]) -> None:
    """Generate `plan` step by step, emitting a Step per token and Done at the end; stop when
    `cancelled` is set or every choice has finished."""
    choices = [ChoiceText(plan.published.tokenizer, plan.stop) for _ in range(plan.n)]
    steps = generate_steps(
        plan.published.model, plan.prompt_ids, num_samples=plan.n, max_new_tokens=plan.max_tokens,
        # Temperature 0 is OpenAI's greedy decoding: gptlab's greedy flag, which ignores it.
        temperature=plan.temperature or 1.0, top_k=plan.top_k, top_p=plan.top_p,
        greedy=plan.temperature == 0, eot_id=plan.published.tokenizer.eot_id,
        generator=torch.Generator(plan.published.device).manual_seed(plan.seed))
    with contextlib.closing(steps):
        for new in steps:
            if cancelled.is_set():
                return
            step = Step()
            for index, (choice, token) in enumerate(zip(choices, new.tolist(), strict=True)):
                if choice.finish_reason is None:
                    step.texts[index] = choice.add(token)
                    if choice.finish_reason:
                        step.finished[index] = choice.finish_reason
            emit(step)
            if all(choice.finish_reason for choice in choices):
                break
    last = Step()
    for index, choice in enumerate(choices):
        if choice.finish_reason is None:
            last.texts[index], last.finished[index] = choice.finish("length"), "length"
    emit(last)
    emit(Done(len(plan.prompt_ids), sum(len(choice.ids) for choice in choices)))


class Busy(ApiError):
    def __init__(self, limits: Limits) -> None:
        super().__init__(503, f"the server is busy ({limits.concurrency} generations running, "
                              f"{limits.queue} waiting); retry after {limits.retry_after_s} s",
                         kind="server_error", code="server_busy",
                         headers={"Retry-After": str(limits.retry_after_s)})


class Runner:
    """At most limits.concurrency generations in worker threads, limits.queue more waiting."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pool = ThreadPoolExecutor(limits.concurrency, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.admitted = 0
        self.running = 0
        self.tokens = 0  # generated since start, all choices counted

    def start(self, plan: Plan) -> Job:
        """A generation started or queued, or Busy when as many are already waiting."""
        with self.lock:
            if self.admitted >= self.limits.concurrency + self.limits.queue:
                raise Busy(self.limits)
            self.admitted += 1
        job = Job(asyncio.get_running_loop())
        self.pool.submit(self.work, plan, job)
        return job

    def work(self, plan: Plan, job: Job) -> None:
        with self.lock:
            self.running += 1
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            run_plan(plan, job.cancelled, lambda event: self.emit(job, event, plan.n))
        except Exception:
            log.exception("generation failed")
            job.send(Failed())
        finally:
            with self.lock:
                self.running -= 1
                self.admitted -= 1

    def emit(self, job: Job, event: Any, n: int) -> None:
        if isinstance(event, Step):
            with self.lock:
                self.tokens += n
        job.send(event)


@dataclass
class Job:
    """A generation as its request handler sees it: events arriving, and a way to stop it."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    next_check: float = 0.0  # when to ask next whether the client is still there

    def send(self, event: Any) -> None:
        """From the worker thread: hand an event to the handler on the event loop."""
        if not self.cancelled.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next_event(self, request: Request) -> Any:
        """The next event; a client gone (checked every DISCONNECT_POLL_S, tokens arriving
        or not) cancels the job, and is answered Failed."""
        while True:
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.cancelled.set()
                    return Failed()
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How one endpoint writes a choice's text, in a whole answer and in a chunk."""

    id_prefix: str
    whole: str  # the "object" of a whole answer
    chunk: str  # and of a streamed chunk
    chat: bool

    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": reason, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

    def delta(self, index: int, text: str | None, reason: str | None,
              first: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": reason,
                    "logprobs": None}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}


COMPLETION = Shape("cmpl-", "text_completion", "text_completion", chat=False)
CHAT = Shape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def whole_answer(job: Job, plan: Plan, shape: Shape, request: Request) -> dict[str, Any]:
    texts, reasons = [""] * plan.n, [None] * plan.n
    while not isinstance(event := await job.next_event(request), Done):
        if isinstance(event, Failed):
            raise ApiError(500, "generation failed (see the server's log)", kind="server_error")
        for index, text in event.texts.items():
            texts[index] += text
        for index, reason in event.finished.items():
            reasons[index] = reason
    answer = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.whole,
              "created": int(time.time()), "model": plan.name,
              "choices": [shape.choice(i, texts[i], reasons[i]) for i in range(plan.n)],
              "usage": usage(event)}
    return {**answer, "notice": plan.notice} if plan.notice else answer


async def streamed_answer(job: Job, plan: Plan, shape: Shape, request: Request,
                          include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token and choice, usage if asked, then [DONE]."""
    head = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.chunk,
            "created": int(time.time()), "model": plan.name}
    notice = {"notice": plan.notice} if plan.notice else {}  # on the first chunk only
    started = set()
    try:
        while not isinstance(event := await job.next_event(request), Done):
            if isinstance(event, Failed):
                error = ApiError(500, "generation failed (see the server's log)",
                                 kind="server_error")
                yield sse(error.body())
                return
            for index in sorted(event.texts.keys() | event.finished.keys()):
                text, reason = event.texts.get(index), event.finished.get(index)
                if text or reason or index not in started:
                    choice = shape.delta(index, text, reason, first=index not in started)
                    started.add(index)
                    yield sse({**head, **notice, "choices": [choice]})
                    notice = {}
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(event)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the response is cancelled) or the answer is complete
        job.cancelled.set()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- the app ---------------------------------------------------------------------------------


def chat_page() -> str:
    return resources.files("gptlab").joinpath("chat_page.html").read_text(encoding="utf-8")


def create_app(models: dict[str, Published], limits: Limits | None = None) -> FastAPI:
    """The server's app for `models` (name -> model, the first one the default)."""
    limits = limits or Limits()
    runner = Runner(limits)
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    page = chat_page()
    created = int(time.time())

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "running": runner.running,
                "waiting": runner.admitted - runner.running, "tokens_generated": runner.tokens}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name, published, created)
                                           for name, published in models.items()]}

    async def answer(request: Request, plan: Plan, shape: Shape, body: SamplingRequest) -> Any:
        job = runner.start(plan)
        if not body.stream:
            return await whole_answer(job, plan, shape, request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(streamed_answer(job, plan, shape, request, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = validated(CompletionRequest, await read_json(request, limits.max_body_bytes))
        plan = plan_request(body, body.prompt, models, limits, DEFAULT_COMPLETION_TOKENS)
        return await answer(request, plan, COMPLETION, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = validated(ChatRequest, await read_json(request, limits.max_body_bytes))
        return await answer(request, chat_prompt(body, models, limits), CHAT, body)

    add_error_handlers(app)
    return app


def model_card(name: str, published: Published, created: int) -> dict[str, Any]:
    """A /v1/models entry, with what a client needs to know of the model."""
    return {"id": name, "object": "model", "created": created, "owned_by": "gptlab",
            "context_length": published.config.model.block_size,
            "parameters": published.model.num_params(),
            "tokenizer": published.tokenizer.kind}


def add_error_handlers(app: FastAPI) -> None:
    """Every failure in OpenAI's error format; an unexpected one logged here, not sent."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = (f"no such endpoint: {request.method} {request.url.path}"
                   if error.status_code in (404, 405) else str(error.detail))
        return JSONResponse(ApiError(error.status_code, message).body(), error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse(ApiError(500, "internal error (see the server's log)",
                                     kind="server_error").body(), 500)


# --- the command -------------------------------------------------------------------------------


def named_models(specs: list[str]) -> dict[str, Path]:
    """`--models` values, each DIR or NAME=DIR, as name -> folder; a folder's name by default."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        path = Path(folder)
        name = name or path.resolve().name
        if name in named:
            raise GptlabError(f"--models {spec}: a second model named {name!r}; name them, "
                              f"as NAME=DIR")
        named[name] = path
    return named


def serve(specs: list[str], host: str, port: int, device: torch.device, dtype: str,
          limits: Limits) -> None:
    """Load every model, its weights cast to `dtype` (a sample.dtype name), then answer on
    host:port until interrupted."""
    import uvicorn

    from gptlab.generate import load_for_generation

    models = {name: load_for_generation(path, device, dtype, "--dtype")
              for name, path in named_models(specs).items()}
    if host != LOOPBACK:
        print(f"note: listening on {host}: anyone who can reach this machine can use the "
              f"models", flush=True)
    print(f"serving {', '.join(models)} on http://{host}:{port}/ (the chat page; the API "
          f"under /v1)", flush=True)
    uvicorn.run(create_app(models, limits), host=host, port=port, log_level="warning")
