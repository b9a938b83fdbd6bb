"""`parafork serve`: an OpenAI-compatible HTTP server over one APAR engine.

One `EngineWorker` (an OS thread) owns the `LLM` and runs its step loop; every client's
request joins the same batch. HTTP handlers never touch the engine: they talk to the worker
through a command queue (add, abort) and receive outputs on per-request asyncio queues;
`/metrics` (Prometheus, through `prometheus_client`) reads the `EngineStats` snapshot the
worker takes after each step, and latency histograms the worker fills from each finished
request's `RequestTimes`. A client that disconnects aborts its request, which frees its KV
blocks at once.

A client's text is text: the worker encodes messages with their contents as text
(`models.apply_chat_template(text_only=True)`), so `<|im_end|><|im_start|>system` or `[Fork]`
written by a client never become the model's control tokens (unless the server is started with
`--allow-special-tokens-in-text`); `prompt_token_ids` stay what the client sent.
"""
from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine.outputs import EngineStats, RequestOutput
from .llm import LLM
from .sampling import ANSWER_MAX_TOKENS, MAX_DEPTH, MAX_DRAFT_SIBLINGS, MAX_DRAFT_TOKENS, Mode, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- the engine worker ------------------------------------------------------------------
@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    stream: bool = False


@dataclass(frozen=True)
class _Add:
    """Start one engine request per choice (`n`) of one prompt; `request_ids[i]` answers `choices[i]`."""
    request_ids: list[str]
    prompt: object
    choices: list[SamplingParams]
    stream: bool


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Drain:
    """Let requests in flight finish until `deadline` (time.monotonic()), then abort the rest and stop."""
    deadline: float


@dataclass(frozen=True)
class _Deferred:
    """A later choice of an `_Add`, started one step after the first (it then finds the prompt's
    KV blocks in the prefix cache)."""
    request_id: str
    prompt: object
    params: SamplingParams
    stream: bool


# Histograms as vLLM names and buckets its own (`vllm:` -> `parafork:`), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                   960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
# Gauges and counters: the engine's snapshot (EngineStats), read at each scrape.
GAUGES = {
    "num_requests_running": ("requests in the running batch", lambda s: s.requests_running),
    "num_requests_waiting": ("requests waiting to be admitted", lambda s: s.requests_waiting),
    "num_threads_live": ("APAR threads of the running requests", lambda s: s.threads_live),
    "num_sequences_live": ("runner sequence ids in use", lambda s: s.sequences_live),
    "kv_blocks_used": ("KV blocks held", lambda s: s.kv_blocks_total - s.kv_blocks_free),
    "kv_blocks_free": ("KV blocks free", lambda s: s.kv_blocks_free),
    "kv_cache_usage_perc": ("share of the KV pool held, 0..1", lambda s: 1 - s.kv_blocks_free / max(1, s.kv_blocks_total)),
    "admission_growth_ratio": ("admission's estimate of the budget left that becomes KV (scheduler.py)",
                               lambda s: s.growth_ratio),
}
COUNTERS = {
    "requests": ("requests added", lambda s: s.requests_total),
    "generation_tokens": ("tokens generated over all threads, control tokens included", lambda s: s.generated_tokens_total),
    "steps": ("decode steps (forward passes)", lambda s: s.steps_total),
    "forks": ("threads forked", lambda s: s.forks_total),
    "joins": ("[Join]s sampled", lambda s: s.joins_total),
    "prefix_cache_hit_tokens": ("prompt tokens whose KV came from the prefix cache", lambda s: s.prefix_cache_hit_tokens_total),
    "draft_tokens": ("speculative draft tokens fed", lambda s: s.draft_tokens_total),
    "accepted_draft_tokens": ("draft tokens accepted", lambda s: s.accepted_draft_tokens_total),
    "head_draft_tokens": ("draft tokens from a trained head", lambda s: s.head_draft_tokens_total),
    "head_accepted_draft_tokens": ("head draft tokens accepted", lambda s: s.head_accepted_draft_tokens_total),
    "preemptions": ("requests preempted for lack of KV", lambda s: s.preemptions_total),
    "recomputed_tokens": ("tokens fed again after preemptions", lambda s: s.recomputed_tokens_total),
    "serialized_steps": ("request-steps run one thread at a time for lack of KV", lambda s: s.serialized_steps_total),
    "deferred_forks": ("forks whose child got its KV a step later", lambda s: s.deferred_forks_total),
}


class Metrics:
    """The server's Prometheus registry: the engine's snapshot as gauges and counters, and the
    histograms the worker fills (one registry per app, so several servers in one process do not mix)."""

    def __init__(self, worker: EngineWorker) -> None:
        from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` gauge beside every histogram (as vLLM)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.worker = worker

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"parafork:{name}", doc, buckets=buckets, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "request added to its first generated token", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds",
                        "between two outputs of a streamed request that carried new text (one per step it gained text)",
                        ITL_BUCKETS)
        self.tpot = hist("request_time_per_output_token_seconds",
                         "first token to finish over the answer's tokens after the first", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "request added to finished", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "request added to its first step", REQUEST_BUCKETS)
        self.step = hist("decode_step_seconds", "one engine step (all running threads)", STEP_BUCKETS)
        self.threads = hist("request_threads", "APAR threads per finished request", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.tokens_per_step = hist("request_tokens_per_step", "answer tokens over decode steps, per finished request",
                                    (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0))

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.worker.stats  # one immutable snapshot, taken by the worker
        for name, (doc, value) in GAUGES.items():
            yield GaugeMetricFamily(f"parafork:{name}", doc, value=value(stats))
        for name, (doc, value) in COUNTERS.items():
            yield CounterMetricFamily(f"parafork:{name}", doc, value=value(stats))

    def finished(self, out: RequestOutput) -> None:
        t = out.times
        if t is None or t.finished is None:
            return
        self.e2e.observe(t.finished - t.arrival)
        if t.scheduled is not None:
            self.queue.observe(max(0.0, t.scheduled - t.arrival))
        if t.first_token is not None:
            self.ttft.observe(t.first_token - t.arrival)
            self.tpot.observe((t.finished - t.first_token) / max(1, len(out.token_ids) - 1))
        self.threads.observe(out.num_threads)
        self.tokens_per_step.observe(len(out.token_ids) / max(1, out.num_steps))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def read_metrics(text: str) -> dict[str, float]:
    """A `/metrics` page parsed with `prometheus_client`'s own parser: sample name (with its
    labels, if any, as `name{k="v"}`) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class EngineWorker:
    """Owns the LLM; every engine call happens on its OS thread."""

    def __init__(self, llm: LLM, text_only: bool = True) -> None:
        self.llm = llm
        self.text_only = text_only  # a client's text is encoded as text (module docstring)
        self.metrics = Metrics(self)
        self._last_text: dict[str, float] = {}  # streamed request -> when its previous text went out
        self.commands: queue.Queue = queue.Queue()
        self.pending: dict[str, _Pending] = {}
        self.stats: EngineStats = llm.stats()  # replaced whole after each step; read by /metrics
        self.thread = threading.Thread(target=self._run, name="parafork-engine", daemon=True)
        self.thread.start()

    def submit(
        self, prompt, choices: list[SamplingParams], stream: bool, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[str, _Pending]]:
        """One engine request per choice (`n`), all of the same prompt."""
        base = f"cmpl-{uuid.uuid4().hex[:24]}"
        ids = [base] + [f"{base}-{i}" for i in range(1, len(choices))]
        pendings = [_Pending(loop, stream=stream) for _ in choices]
        self.pending.update(zip(ids, pendings))
        self.commands.put(_Add(ids, prompt, choices, stream))
        return list(zip(ids, pendings))

    def abort(self, request_id: str) -> None:
        self.commands.put(_Abort(request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Lets in-flight requests finish (up to `timeout`), then aborts the rest."""
        self.commands.put(_Drain(time.monotonic() + timeout))
        self.thread.join(timeout + 5)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        pending = self.pending.get(request_id)
        if pending is not None:
            pending.loop.call_soon_threadsafe(pending.outputs.put_nowait, item)
            if isinstance(item, Exception) or item.finished:
                self.pending.pop(request_id, None)

    def _handle(self, command: _Add | _Abort | _Drain) -> None:
        if isinstance(command, _Add):  # the first choice now; the others after the next step
            ids, stream = command.request_ids, command.stream
            try:
                prompt = {"prompt_token_ids": self._encode(command.prompt)}
                self.llm.add_request(prompt, command.choices[0], request_id=ids[0], stream=stream)
            except ValueError as e:
                for rid in ids:
                    self._deliver(rid, APIError(400, str(e)))
                return
            self.deferred += [_Deferred(rid, prompt, params, stream) for rid, params in zip(ids[1:], command.choices[1:])]
        elif isinstance(command, _Abort):
            self.llm.abort(command.request_id)
            self.pending.pop(command.request_id, None)
            self._last_text.pop(command.request_id, None)
        else:
            self._drain_deadline = command.deadline

    def _encode(self, prompt) -> list[int]:
        """Chat messages or a completion's text as token ids, a client's text as text
        (`text_only`); token ids as they are."""
        from . import models

        if isinstance(prompt, dict):
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        return models.apply_chat_template(self.llm.tokenizer, prompt, text_only=self.text_only)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """A text's token ids as the worker encodes a completion's prompt (for /tokenize)."""
        return self.llm.tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=self.text_only)

    def _observe(self, out: RequestOutput, now: float) -> None:
        """The latency histograms (`Metrics`): per finished request, and between a streamed
        request's outputs that carried new text."""
        if out.delta and out.request_id in self.pending and self.pending[out.request_id].stream:
            last = self._last_text.get(out.request_id)
            if last is not None:
                self.metrics.itl.observe(now - last)
            self._last_text[out.request_id] = now
        if out.finished:
            self._last_text.pop(out.request_id, None)
            if not out.error:
                self.metrics.finished(out)

    def _add_deferred(self) -> None:
        deferred, self.deferred = self.deferred, []
        for d in deferred:
            if d.request_id in self.pending:  # not aborted meanwhile
                self.llm.add_request(d.prompt, d.params, request_id=d.request_id, stream=d.stream)

    def _run(self) -> None:
        self._drain_deadline: float | None = None
        self.deferred: list[_Deferred] = []
        while True:
            block = not self.llm.has_unfinished_requests() and self._drain_deadline is None
            try:
                while True:
                    self._handle(self.commands.get(block=block, timeout=0.5 if block else None))
                    block = False
            except queue.Empty:
                pass
            if self._drain_deadline is not None and (
                not self.llm.has_unfinished_requests() or time.monotonic() > self._drain_deadline
            ):
                for request_id in list(self.pending):
                    self.llm.abort(request_id)
                    self._deliver(request_id, APIError(503, "the server is shutting down", "server_error"))
                return
            if not self.llm.has_unfinished_requests():
                self.stats = self.llm.stats()
                continue
            try:
                started = time.monotonic()
                outputs = self.llm.step()
                now = time.monotonic()
                self.metrics.step.observe(now - started)
            except Exception as e:  # an engine failure ends the requests in flight, not the server
                for request_id in list(self.pending):
                    self.llm.abort(request_id)
                    self._deliver(request_id, APIError(500, f"engine error: {e}", "server_error"))
                continue
            for out in outputs:
                self._observe(out, now)
                if out.finished and out.error:  # failed inside the engine: a 500 with the reason
                    if out.delta:  # what a streamed client has not seen yet, before the error
                        self._deliver(out.request_id, replace(out, finished=False))
                    self._deliver(out.request_id, APIError(500, out.error, "server_error"))
                elif out.delta or out.finished:
                    self._deliver(out.request_id, out)
            self._add_deferred()
            self.stats = self.llm.stats()


# ---- request bodies ---------------------------------------------------------------------
class ParaforkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode = "apar"
    max_depth: int | None = Field(None, ge=1, le=MAX_DEPTH)  # None: the model's default (SamplingParams.max_depth)
    max_threads: int = Field(16, ge=1, le=64)
    plan_budget: bool = True
    no_repeat_heads: bool = True
    speculative: Literal["ngram", "eagle", "off"] | None = None  # None: the server's --speculative
    # None: the engine's default where the request drafts; set where it does not draft that way: a 400.
    num_draft_tokens: int | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS)
    num_draft_siblings: int | None = Field(None, ge=0, le=MAX_DRAFT_SIBLINGS)  # "eagle" only (SamplingParams)
    join: bool | None = None  # None: the model's default (SamplingParams.join)


# Fields clients send that parafork does not implement yet: their "off" values are accepted (they
# change nothing), any other value is refused with a 400 naming the field, never silently ignored.
NOT_IMPLEMENTED = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
}
HARMLESS = ("user", "metadata", "stream_options", "service_tier", "store")  # do not change the answer


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked in `sampling`, never dropped unseen
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=8)
    logit_bias: dict[int, float] | None = None  # OpenAI sends token ids as strings; pydantic converts
    skip_special_tokens: bool = True  # vLLM's extension; raw mode always shows the [Fork] markers
    ignore_eos: bool = False  # vLLM's extension (its serving benchmark sends it): run to max_tokens
    stop: str | list[str] | None = None
    # Unset or null: the model's default (`LLM.sampling_defaults`; the bundled model's card says which).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's extension
    parafork: ParaforkOptions = ParaforkOptions()

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def logprobs_wanted(self) -> int | None:
        return None

    def check_extra_fields(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if name not in NOT_IMPLEMENTED:
                raise APIError(400, f"unknown parameter {name!r}", param=name)
            if value not in NOT_IMPLEMENTED[name]:
                raise APIError(400, f"parameter {name!r} is not supported by parafork yet (it would change the result)",
                               param=name)

    def sampling(self, limit: int) -> SamplingParams:
        self.check_extra_fields()
        if self.logit_bias and not all(-100 <= v <= 100 for v in self.logit_bias.values()):
            raise APIError(400, "logit_bias values must be in [-100, 100]", param="logit_bias")
        max_tokens = self.max_completion_tokens or self.max_tokens or min(ANSWER_MAX_TOKENS, limit)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limit}", param="max_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            mode=self.parafork.mode,
            max_depth=self.parafork.max_depth,
            max_threads=self.parafork.max_threads,
            plan_budget=self.parafork.plan_budget,
            no_repeat_heads=self.parafork.no_repeat_heads,
            speculative=self.parafork.speculative,
            num_draft_tokens=self.parafork.num_draft_tokens,
            num_draft_siblings=self.parafork.num_draft_siblings,
            join=self.parafork.join,
            logit_bias=self.logit_bias,
            skip_special_tokens=self.skip_special_tokens,
            ignore_eos=self.ignore_eos,
            stop=self.stop or (),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=self.logprobs_wanted(),
        )


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str
    add_special_tokens: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    # A string, or OpenAI's list of content parts: text parts are joined in order with "\n" (as
    # vLLM joins them); any other part (image_url, input_audio, file, ...) is refused by name.
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content part {i} is of type {kind!r}: this server serves a text model and takes "
                                 "text parts only ({'type': 'text', 'text': ...})")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"content part {i}: a text part is {{'type': 'text', 'text': <string>}}")
            texts.append(part["text"])
        if not texts:
            raise ValueError("content is an empty list of parts")
        return "\n".join(texts)


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_Common):
    # The OpenAI forms: a string, token ids, or a list of either holding one prompt; a list of
    # several prompts is refused (one prompt per request: send one request each).
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            if len(v) > 1:
                raise ValueError(f"a list of {len(v)} prompts: this server takes one prompt per request "
                                 "(a string, token ids, or a list holding one of those); send one request each")
            v = v[0]
        if isinstance(v, list) and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            raise ValueError("a prompt is a string, a list of token ids (integers >= 0), or a list holding one of those")
        return v


# ---- the app ----------------------------------------------------------------------------
def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_tokens_limit: int = 4096,
               special_tokens_in_text: bool = False) -> FastAPI:
    """`special_tokens_in_text`: parse special-token strings inside a client's text as the
    tokens they name (off: they are text; see the module docstring)."""
    engine = EngineWorker(llm, text_only=not special_tokens_in_text)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)  # in-flight requests finish or get a clean error

    app = FastAPI(title="parafork", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        where = f"{param}: " if param else ""
        return JSONResponse(error_body(f"invalid request: {where}{first.get('msg', e)}", "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error"), 401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "parafork"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = engine.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        """vLLM's extension (its serving benchmark calls it): a prompt's token ids, its text as text."""
        check_model(body.model)
        ids = await asyncio.to_thread(engine.encode_text, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_model_len}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", param="model")

    async def run(request: Request, prompt, body: _Common, kind: str):
        check_model(body.model)
        params = body.sampling(max_tokens_limit)
        # Choice i is seeded seed + i: each equals a single request with that seed.
        choices = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(body.n)]
        submitted = engine.submit(prompt, choices, body.stream, asyncio.get_running_loop())
        ids = [request_id for request_id, _ in submitted]
        reply = _Reply(kind, ids[0], model_name, llm.tokenizer, body.n)
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(index: int, pending: _Pending) -> None:
            while True:
                item = await pending.outputs.get()
                await merged.put((index, item))
                if isinstance(item, APIError) or item.finished:
                    return

        tasks = [asyncio.ensure_future(forward(i, p)) for i, (_, p) in enumerate(submitted)]
        if body.stream:
            return StreamingResponse(_sse(request, ids, merged, tasks, reply), media_type="text/event-stream")
        finals: dict[int, RequestOutput] = {}
        try:
            while len(finals) < body.n:
                index, out = await merged.get()
                if isinstance(out, APIError):
                    raise out
                if out.finished:
                    finals[index] = out
            return reply.final([finals[i] for i in range(body.n)])
        finally:
            for task in tasks:
                task.cancel()
            for request_id in ids:
                if request_id in engine.pending:  # an error or a cancel left it running
                    engine.abort(request_id)

    async def _sse(request: Request, ids: list[str], merged: asyncio.Queue, tasks: list, reply: _Reply) -> AsyncIterator[str]:
        finished = 0
        try:
            while finished < len(ids):
                try:
                    index, out = await asyncio.wait_for(merged.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(out, APIError):
                    yield f"data: {json.dumps(error_body(out.message, out.type))}\n\n"
                    return
                finished += out.finished
                yield f"data: {json.dumps(reply.chunk(index, out, last=finished == len(ids)))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for request_id in ids:
                if request_id in engine.pending:  # the client went away mid-stream
                    engine.abort(request_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatBody):
        return await run(request, [m.model_dump() for m in body.messages], body, "chat")  # encoded by the worker

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        prompt = body.prompt if isinstance(body.prompt, str) else {"prompt_token_ids": body.prompt}
        return await run(request, prompt, body, "text")

    return app


def _usage(outs: list[RequestOutput]) -> dict:
    """The prompt counted once; completions, threads and generated tokens summed over the choices."""
    completion = sum(len(o.token_ids) for o in outs)
    prompt = outs[0].num_prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "parafork": {
            "decode_steps": max(o.num_steps for o in outs),
            "threads": sum(o.num_threads for o in outs),
            "generated_tokens": sum(o.num_generated_tokens for o in outs),
            "draft_tokens": sum(o.num_draft_tokens for o in outs),
            "accepted_draft_tokens": sum(o.num_accepted_tokens for o in outs),
            "preemptions": sum(o.num_preemptions for o in outs),
            "recomputed_tokens": sum(o.num_recomputed_tokens for o in outs),
            "serialized_steps": sum(o.num_serialized_steps for o in outs),
            "deferred_forks": sum(o.num_deferred_forks for o in outs),
        },
    }


class _Reply:
    """OpenAI-shaped bodies for one request: the final one, or streamed chunks (each carrying
    the log-probabilities of the tokens that became final since the previous chunk)."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer, n: int = 1) -> None:
        self.kind, self.request_id, self.model, self.tokenizer = kind, request_id, model, tokenizer
        self.created = int(time.time())
        self.sent_tokens = [0] * n  # per choice
        self.finals: dict[int, RequestOutput] = {}

    def _logprobs(self, out: RequestOutput, start: int, end: int) -> dict | None:
        if out.logprobs is None:
            return None
        pieces = out.logprobs[start:end]
        tokens = out.token_ids[start:end]
        text = self.tokenizer.decode
        if self.kind == "chat":
            def entry(token: int, lp: float) -> dict:
                s = text([token])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top]}
                                for t, (lp, top) in zip(tokens, pieces)]}
        return {
            "tokens": [text([t]) for t in tokens],
            "token_logprobs": [lp for lp, _ in pieces],
            "top_logprobs": [{text([a]): v for a, v in top} for _, top in pieces],
        }

    def _body(self, choices: list[dict], obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def final(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(outs):
            choice = {"index": index, "finish_reason": out.finish_reason, "logprobs": self._logprobs(out, 0, len(out.token_ids))}
            if self.kind == "chat":
                choices.append({**choice, "message": {"role": "assistant", "content": out.text}})
            else:
                choices.append({**choice, "text": out.text})
        return {**self._body(choices, "chat.completion" if self.kind == "chat" else "text_completion"), "usage": _usage(outs)}

    def chunk(self, index: int, out: RequestOutput, last: bool) -> dict:
        """Choice `index`'s new text; the chunk that ends the last choice carries the usage of all."""
        end = len(out.token_ids)
        logprobs = self._logprobs(out, self.sent_tokens[index], end)
        self.sent_tokens[index] = max(self.sent_tokens[index], end)
        choice = {"index": index, "finish_reason": out.finish_reason if out.finished else None, "logprobs": logprobs}
        if self.kind == "chat":
            body = self._body([{**choice, "delta": {"role": "assistant", "content": out.delta}}], "chat.completion.chunk")
        else:
            body = self._body([{**choice, "text": out.delta}], "text_completion")
        if out.finished:
            self.finals[index] = out
        if last:
            body["usage"] = _usage([self.finals[i] for i in sorted(self.finals)])
        return body


def serve(args) -> None:
    import uvicorn

    from .config import engine_options

    llm = LLM(args.model, num_kv_blocks=args.kv_blocks, **engine_options(args))
    app = create_app(llm, args.served_name or args.model, api_key=args.api_key,
                     special_tokens_in_text=args.allow_special_tokens_in_text)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
