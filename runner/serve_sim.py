"""``rackscope serve-sim``: the simulated engine behind an OpenAI-compatible HTTP server.

A stand-in for trtllm-serve or vLLM that needs no GPU: ``POST /v1/completions`` and
``POST /v1/chat/completions`` (streaming as server-sent events, one chunk per token, or one
JSON answer), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text: the
simulation's own series, and the engine's state under vLLM's names so that what reads a vLLM
server reads this one). The timing comes from ``SimEngine`` on the wall clock, so a load
generator pointed at it sees the TTFT, TPOT and throughput of the simulated GPUs. Every
answer is labelled simulated (``owned_by``, the ``rackscope_sim_info`` series).

The simulated model has no end-of-sequence token: it always writes ``max_tokens`` tokens and
finishes with ``finish_reason="length"``. Prompt lengths are estimated at four characters per
token, or counted when the prompt is a list of token ids.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from rackscope.errors import ConfigError
from rackscope.runner.engines.base import Done, EngineEvent, Failed, FirstToken, Tokens

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.metrics_core import Metric

    from rackscope.runner.engines.base import EngineStats
    from rackscope.runner.engines.sim import EventChannel, SimEngine

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat has no default limit in the API; with no end-of-sequence token the simulation needs one.
DEFAULT_CHAT_MAX_TOKENS = 256
CHAT_TOKENS_PER_MESSAGE = 4  # role header and separators of the chat template, per message
CHAT_REPLY_PRIMER_TOKENS = 3  # the assistant header the template appends
SHUTDOWN_TIMEOUT_S = 5.0
# What the simulated model "says": one JSON-encoded string per token, cycled.
TOKEN_TEXTS = (
    " This", " is", " a", " simulated", " answer", " from", " rackscope", ",", " written", " one",
    " token", " at", " a", " time", " by", " a", " model", " of", " a", " GPU", " that", " does",
    " not", " exist", ".", "\n",
)
# vLLM (v1)'s histogram buckets, seconds: a reader of vLLM's histograms reads these alike.
VLLM_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                      40.0, 80.0)


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(slots=True)
class CompletionParams:
    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool


# --- request parsing --------------------------------------------------------------------------
def _int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if value < minimum:
        raise ApiError(400, f"'{name}' must be at least {minimum}, got {value}", param=name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean", param=name)
    return value


def _text_tokens(text: str) -> int:
    from rackscope.runner.engines.sim import CHARS_PER_TOKEN

    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def prompt_tokens(prompt: object) -> int:
    """Token count of a completions ``prompt``: text, token ids, or a batch of one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, _text_tokens(prompt))
    if _is_token_ids(prompt):
        assert isinstance(prompt, list)
        return len(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
    raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")


def messages_tokens(messages: object) -> int:
    """Token count of chat ``messages`` through a Llama-2-like template."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    total = CHAT_REPLY_PRIMER_TOKENS
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, "content parts must be objects with a string 'text'", param="messages")
            content = "".join(t for t in texts if isinstance(t, str))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, "message 'content' must be a string or a list of parts", param="messages")
        total += CHAT_TOKENS_PER_MESSAGE + _text_tokens(content)
    return total


def parse_request(body: object, chat: bool, served_model: str, max_seq_len: int) -> CompletionParams:
    """Validate a completions or chat request the way the OpenAI API does (400 / 404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if chat:
        if "messages" not in body:
            raise ApiError(400, "you must provide 'messages'", param="messages")
        n_prompt = messages_tokens(body["messages"])
    else:
        if "prompt" not in body:
            raise ApiError(400, "you must provide a 'prompt'", param="prompt")
        n_prompt = prompt_tokens(body["prompt"])
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    max_tokens = _int(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    if n_prompt >= max_seq_len:
        raise ApiError(
            400, f"the prompt ({n_prompt} tokens) does not fit the model's context of {max_seq_len} tokens",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS, max_seq_len - n_prompt)
    elif n_prompt + max_tokens > max_seq_len:
        raise ApiError(
            400, f"{n_prompt} prompt tokens + {max_tokens} max tokens exceed the model's context of {max_seq_len}",
            param="max_tokens", code="context_length_exceeded",
        )
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens is not None and min_tokens > max_tokens:
        message = f"'min_tokens' ({min_tokens}) must not exceed max tokens ({max_tokens})"
        raise ApiError(400, message, param="min_tokens")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = _bool(options, "include_usage", False)
    return CompletionParams(
        chat=chat, prompt_tokens=n_prompt, max_tokens=max_tokens, stream=stream,
        include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos", False),
    )


# --- response bytes ---------------------------------------------------------------------------
def _dumps(value: object) -> bytes:
    return orjson.dumps(value)


class _Chunks:
    """Pre-encoded SSE chunks of one response: a per-request prefix, a per-token middle."""

    __slots__ = ("_first", "_last", "_max_tokens", "_mid", "_prefix", "_tail", "_texts", "_usage_head")

    _texts_cache: tuple[bytes, ...] = ()

    def __init__(self, chat: bool, rid: str, created: int, model: str, include_usage: bool, max_tokens: int) -> None:
        if not _Chunks._texts_cache:
            _Chunks._texts_cache = tuple(_dumps(t) for t in TOKEN_TEXTS)
        self._texts = _Chunks._texts_cache
        self._max_tokens = max_tokens
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        head = b'{"id":"' + rid.encode() + b'","object":"' + obj + b'","created":' + str(created).encode()
        head += b',"model":' + _dumps(model)
        self._usage_head = head
        usage = b',"usage":null' if include_usage else b""
        if chat:
            head += b',"system_fingerprint":null'
            self._prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._first = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
            self._mid = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._last = self._mid
            self._tail = b"data: " + head + b',"choices":[{"index":0,"delta":{},"logprobs":null,'
            self._tail += b'"finish_reason":"length"}]' + usage + b"}\n\n"
        else:
            self._prefix = self._first = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._mid = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._last = b',"logprobs":null,"finish_reason":"length"}]' + usage + b"}\n\n"
            self._tail = b""

    def tokens(self, start: int, count: int) -> bytes:
        """``count`` token chunks beginning with token number ``start`` (0-based)."""
        texts, n, max_tokens = self._texts, len(self._texts), self._max_tokens
        parts: list[bytes] = []
        for i in range(start, start + count):
            parts.append(self._first if i == 0 else self._prefix)
            parts.append(texts[i % n])
            parts.append(self._last if i == max_tokens - 1 else self._mid)
        return b"".join(parts)

    def finish(self, usage: dict[str, int] | None) -> bytes:
        out = self._tail
        if usage is not None:
            out += b"data: " + self._usage_head + b',"choices":[],"usage":' + _dumps(usage) + b"}\n\n"
        return out + b"data: [DONE]\n\n"


def _text(count: int) -> str:
    return "".join(itertools.islice(itertools.cycle(TOKEN_TEXTS), count))


def _error_body(event: Failed) -> dict[str, object]:
    return {"error": {"message": event.message, "type": "server_error", "param": None, "code": event.error_type}}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- latencies as the server sees them --------------------------------------------------------
class LatencyHistogram:
    """Observations counted into fixed upper bounds (the last bucket: +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value`` (a bucket counts values up to and including its bound)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus text writes them, the last ``+Inf``."""
        return [("+Inf" if math.isinf(b) else repr(float(b)), float(c))
                for b, c in zip((*self.bounds, math.inf), itertools.accumulate(self.counts), strict=True)]


class ServerLatency:
    """The server's TTFT and inter-token latency histograms (vLLM's buckets)."""

    def __init__(self) -> None:
        self.ttft = LatencyHistogram(VLLM_TTFT_BUCKETS_S)
        self.itl = LatencyHistogram(VLLM_ITL_BUCKETS_S)


class _Timing:
    """One request's events on their way to its channel: its TTFT and token gaps observed."""

    __slots__ = ("arrival_s", "forward", "last_s", "latency", "tokens")

    def __init__(self, latency: ServerLatency, arrival_s: float, forward: Callable[[EngineEvent], None]) -> None:
        self.latency = latency
        self.arrival_s = arrival_s
        self.forward = forward
        self.last_s: float | None = None
        self.tokens = 0

    def push(self, event: EngineEvent) -> None:
        kind = type(event)
        if kind is FirstToken:
            assert isinstance(event, FirstToken)
            self.latency.ttft.observe(max(0.0, event.t - self.arrival_s))
            self._together(event.count - 1)
            self.last_s, self.tokens = event.t, event.count
        elif kind is Tokens and self.last_s is not None:
            assert isinstance(event, Tokens)
            self.latency.itl.observe(max(0.0, event.t - self.last_s))
            self._together(event.count - 1)
            self.last_s, self.tokens = event.t, self.tokens + event.count
        elif kind is Done and self.last_s is not None:
            assert isinstance(event, Done)
            # A request not streamed token by token reports its first token and its end only:
            # its remaining tokens are taken as evenly spaced in between.
            rest = event.output_tokens - self.tokens
            if rest > 0:
                self.latency.itl.observe(max(0.0, event.t - self.last_s) / rest, rest)
            self.tokens = event.output_tokens
        self.forward(event)

    def _together(self, n: int) -> None:
        if n > 0:  # tokens that came out with the one before them
            self.latency.itl.observe(0.0, n)


# --- the server -------------------------------------------------------------------------------
def _json_response(body: object, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _metric_families(engine: SimEngine, model: str, latency: ServerLatency | None = None) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    stats = engine.stats()
    gpu_model = engine.gpus[0].profile.name
    info = GaugeMetricFamily(
        "rackscope_sim_info", "A simulated engine (no real GPU) serving this model",
        labels=["model", "gpu_model", "simulated"],
    )
    info.add_metric([model, gpu_model, "true"], 1.0)
    waiting = GaugeMetricFamily("rackscope_sim_requests_waiting", "Requests queued for a GPU", labels=["model"])
    waiting.add_metric([model], stats.queued)
    labels = ["model", "gpu"]
    running = GaugeMetricFamily("rackscope_sim_requests_running", "Requests in a GPU's batch", labels=labels)
    generated = CounterMetricFamily("rackscope_sim_generation_tokens", "Output tokens generated", labels=labels)
    prompt = CounterMetricFamily("rackscope_sim_prompt_tokens", "Prompt tokens prefilled", labels=labels)
    finished = CounterMetricFamily(
        "rackscope_sim_requests_finished", "Requests finished, by outcome", labels=[*labels, "outcome"]
    )
    kv_ratio = GaugeMetricFamily(
        "rackscope_sim_kv_cache_usage_ratio", "Fraction of the KV cache written", labels=labels
    )
    kv_bytes = GaugeMetricFamily("rackscope_sim_kv_cache_usage_bytes", "KV cache written", labels=labels)
    for g in stats.gpus:
        key = [model, str(g.gpu)]
        running.add_metric(key, g.running + g.prefilling)
        generated.add_metric(key, g.output_tokens)
        prompt.add_metric(key, g.input_tokens)
        finished.add_metric([*key, "ok"], g.requests_done)
        finished.add_metric([*key, "error"], g.requests_failed)
        kv_ratio.add_metric(key, g.kv_used_tokens / g.kv_capacity_tokens)
        kv_bytes.add_metric(key, g.kv_used_bytes)
    return [info, waiting, running, generated, prompt, finished, kv_ratio, kv_bytes,
            *_vllm_families(stats, model, latency)]


def _vllm_families(stats: EngineStats, model: str, latency: ServerLatency | None = None) -> list[Metric]:
    """The engine's state as vLLM (v1) names it, so whatever reads a vLLM server reads this one:
    one engine (``engine="0"``) over all the simulated GPUs, its KV-cache usage the share of
    all their cache in use, and its TTFT and inter-token latency histograms."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    labels, key = ["engine", "model_name"], ["0", model]
    gpus = stats.gpus
    families: list[Metric] = []
    for name, help_text, value in (
        ("vllm:num_requests_running", "Number of requests in model execution batches.",
         sum(g.running + g.prefilling for g in gpus)),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.queued),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
         sum(g.kv_used_tokens for g in gpus) / sum(g.kv_capacity_tokens for g in gpus)),
    ):
        gauge = GaugeMetricFamily(name, help_text, labels=labels)
        gauge.add_metric(key, value)
        families.append(gauge)
    for name, help_text, total in (
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", sum(g.input_tokens for g in gpus)),
        ("vllm:generation_tokens", "Number of generation tokens processed.", sum(g.output_tokens for g in gpus)),
    ):
        counter = CounterMetricFamily(name, help_text, labels=labels)
        counter.add_metric(key, total)
        families.append(counter)
    if latency is not None:
        for name, help_text, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", latency.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", latency.itl),
        ):
            family = HistogramMetricFamily(name, help_text, labels=labels)
            family.add_metric(key, hist.cumulative(), hist.sum)
            families.append(family)
    return families


class SimServer:
    """The OpenAI-compatible HTTP face of one ``SimEngine`` (which must be started)."""

    def __init__(self, engine: SimEngine, model: str | None = None) -> None:
        self.engine = engine
        self.model = model or engine.model
        self.latency = ServerLatency()
        self.created = int(time.time())
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count()

    def app(self) -> web.Application:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    def runner(self) -> web.AppRunner:
        """An ``AppRunner`` for ``app()``: no access log (it would cost more than a request),
        and a client that disconnects cancels its handler, which withdraws its request."""
        from aiohttp import web

        return web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )

    # --- endpoints -------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model, "object": "model", "created": self.created, "owned_by": "rackscope (simulated)",
            "max_model_len": self.engine.max_seq_len,
        }
        return _json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.available:
            return _json_response({"status": "unavailable", "simulated": True}, status=503)
        return _json_response({"status": "ok", "simulated": True})

    async def metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST
        from prometheus_client.exposition import generate_latest
        from prometheus_client.registry import Collector, CollectorRegistry

        engine, model, latency = self.engine, self.model, self.latency

        class _Snapshot(Collector):
            def collect(self) -> Iterable[Metric]:
                return _metric_families(engine, model, latency)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot())
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- generation ------------------------------------------------------------------------
    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        from rackscope.runner.engines.base import Request
        from rackscope.runner.engines.sim import EventChannel

        try:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
            params = parse_request(body, chat, self.model, self.engine.max_seq_len)
        except ApiError as exc:
            return _json_response(exc.body, exc.status)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{next(self._ids):x}"
        job_request = Request(
            rid, input_tokens=params.prompt_tokens, max_output_tokens=params.max_tokens, ignore_eos=params.ignore_eos
        )
        channel = EventChannel()
        timing = _Timing(self.latency, self.engine.now(), channel.push)
        job = self.engine.submit(job_request, timing.push, stream_tokens=params.stream)
        try:
            first = channel.events[0] if channel.events else None
            if isinstance(first, Failed):  # refused at once: answer with a status, not a stream
                return self._failure(first)
            if params.stream:
                return await self._stream(request, params, rid, channel)
            return await self._complete(params, rid, channel)
        finally:
            job.cancel()  # a no-op once finished; withdraws the request if the client left

    def _failure(self, event: Failed) -> web.Response:
        status = 503 if event.error_type == "cancelled" or not self.engine.available else 500
        return _json_response(_error_body(event), status)

    async def _complete(self, params: CompletionParams, rid: str, channel: EventChannel) -> web.Response:
        while True:
            for event in await channel.drain():
                if isinstance(event, Failed):
                    return self._failure(event)
                if isinstance(event, Done):
                    return _json_response(self._answer(params, rid, event.output_tokens))

    def _answer(self, params: CompletionParams, rid: str, output_tokens: int) -> dict[str, object]:
        text = _text(output_tokens)
        choice: dict[str, object]
        if params.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": "length"}
        return {
            "id": rid,
            "object": "chat.completion" if params.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": _usage(params.prompt_tokens, output_tokens),
        }

    async def _stream(
        self, request: web.Request, params: CompletionParams, rid: str, channel: EventChannel
    ) -> web.StreamResponse:
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunks = _Chunks(params.chat, rid, int(time.time()), self.model, params.include_usage, params.max_tokens)
        sent = 0
        try:
            while True:
                out: list[bytes] = []
                finished = False
                for event in await channel.drain():
                    if isinstance(event, FirstToken | Tokens):
                        out.append(chunks.tokens(sent, event.count))
                        sent += event.count
                    elif isinstance(event, Done):
                        usage = _usage(params.prompt_tokens, event.output_tokens) if params.include_usage else None
                        out.append(chunks.finish(usage))
                        finished = True
                    else:
                        out.append(b"data: " + orjson.dumps(_error_body(event)) + b"\n\ndata: [DONE]\n\n")
                        finished = True
                await response.write(b"".join(out))
                if finished:
                    break
            await response.write_eof()
        except ConnectionResetError:
            log.debug("client of %s left after %d tokens", rid, sent)
        return response


# --- serving -----------------------------------------------------------------------------------
async def serve(
    *, gpu_model: str, gpus: int, host: str, port: int, model: str, seed: int, node: str, max_batch: int | None
) -> None:
    """Serve until SIGTERM or SIGINT (``rackscope serve-sim``; flags checked by the caller)."""
    from aiohttp import web

    from rackscope.clock import WallClock
    from rackscope.runner.engines.sim import SimEngine
    from rackscope.simgpu import make_node_gpus

    clock = WallClock()
    sim_gpus = make_node_gpus(gpu_model, gpus, clock, node=node, seed=seed)
    engine = SimEngine(sim_gpus, clock, model, max_batch=max_batch)
    await engine.start()
    runner = SimServer(engine).runner()
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(
            f"rackscope serve-sim: {model} on {gpus} simulated {sim_gpus[0].profile.name} "
            f"listening on http://{url_host}:{bound_port}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopping: failing requests in flight and closing connections")
    finally:
        await engine.stop()  # in-flight streams end with an error chunk, so handlers return
        await runner.cleanup()
