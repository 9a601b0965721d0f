"""The ``openai`` engine: a lean streaming client for OpenAI-compatible servers.

It talks to trtllm-serve, vLLM, SGLang and NIM over ``/v1/completions`` or
``/v1/chat/completions`` with ``stream: true``. The point is to cost the client as little
CPU per streamed token as possible, so that a load generator on a few cores keeps up with
a whole node and its timestamps stay close to when the bytes arrived, without ever counting
what it has not checked.

The package, from the socket up:

- ``wire``: one keep-alive HTTP/1.1 connection as a raw ``asyncio.Protocol``: the arrival
  time taken first thing in ``data_received``, chunked decoding on ``bytes``, caps on all it
  buffers, and a fast path for the steady state (reads of whole chunks of content events).
- ``fastpath``: what lets the fast path count without decoding: the first content event of
  a response is decoded with orjson and its bytes around the content string become the
  response's shape; later events of that shape with a plain JSON string in it are the same
  object with another string, checked with a few ``bytes`` operations.
- ``sse``: the general path: events out of the body (a partial one buffered in linear time
  up to ``MAX_EVENT_BYTES``), each vouched for by its shape or decoded, before its content
  chunks count (``bytes.count`` on ``"text":"`` / ``"content":"``).
- ``sinks``: where counts go. ``record()`` appends arrival times from ``data_received`` to an
  array of doubles (no Python object kept per token) and wakes its task once per request;
  ``stream()`` gets one ``Tokens`` event per content-bearing read, not one per token.
- ``engine``: ``OpenAIEngine``, the connection pool (``prewarm(n)`` opens connections ahead of
  a burst) and one watchdog timer for silence and deadlines.

Run it on uvloop (``runner.workers.new_event_loop``): about half the CPU per token of
asyncio's own loop; ``runner.workers.run_client`` also keeps the garbage collector's pauses
off the timestamps (``rackscope run`` and every worker process run that way).
``benchmarks/loadgen.py`` measures it against aiohttp + orjson, whole processes included,
against another revision of the code (``--baseline-tree``), and against a server on a fixed
schedule (its lockstep section).

Timing: a request starts when its bytes are handed to the transport (``record()``'s
``start_s``, taken just before the write, not when its task was scheduled), a token arrives
when ``data_received`` is called with it (the first thing done there), so the client's own
queueing stays out of TTFT and ITL. While requests run, ``live_output_tokens()`` says how many
tokens those in flight through ``record()`` have received (``CountsLiveTokens``), for
telemetry that follows tokens as they stream.

Counting rules: output tokens come from the server's final ``usage`` chunk when it sends
one (``output_tokens_method="usage"``), else from counted content chunks (``"counted"``,
exact when the server sends one token per chunk). Failures never raise out of a stream:
they end it with ``Failed`` whose ``error_type`` is one of ``connect`` (refused, reset
before any response byte, DNS), ``timeout`` (connect took longer than
``connect_timeout_s``, the server was silent for ``timeout_s``, or the request passed its
``request_deadline_s``; the message says which), ``http_4xx`` / ``http_5xx`` (with the
server's reason), ``protocol``, ``cancelled`` (the engine was stopped, or the consumer left
the stream early) or ``engine`` (a request the API cannot carry). ``protocol`` covers a
stream cut short and a server-sent ``error`` event, which keep the tokens that came before,
and a malformed response, which counts none: invalid JSON or JSON of the wrong shape in an
event, a 200 answer that is neither an event stream nor JSON, a compressed body (never asked
for), broken chunked framing, an event longer than ``MAX_EVENT_BYTES``. The engine counts
failures by type in ``error_counts``. A keep-alive connection that the server closed just as
a request went out is retried once on a new connection.

HTTPS uses asyncio's own TLS support (``loop.create_connection(ssl=...)``), so the same
protocol serves both; pass ``ssl_context`` to trust a private CA. Times are
``time.perf_counter()`` seconds, which on Linux is ``CLOCK_MONOTONIC``: the same clock in
every process, so records from several worker processes compare directly. An engine and
its connections belong to the event loop that first used them.
"""

from rackscope.runner.config import DEFAULT_REQUEST_DEADLINE_S
from rackscope.runner.engines.openai.engine import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    ApiName,
    OpenAIEngine,
    is_available,
)
from rackscope.runner.engines.openai.sse import MAX_EVENT_BYTES

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_REQUEST_DEADLINE_S",
    "DEFAULT_TIMEOUT_S",
    "MAX_EVENT_BYTES",
    "ApiName",
    "OpenAIEngine",
    "is_available",
]
