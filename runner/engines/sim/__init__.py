"""The simulated inference engine: continuous batching of Llama2-70B on simulated GPUs.

The engine works at batch-step granularity, never per token. Each GPU runs one iteration at a
time (TensorRT-LLM's in-flight batching): every running request decodes one token and newly
admitted requests have their whole prompt prefilled, which yields their first token. An
iteration costs

    step_s = (overhead + decode_token_s * decode_batch + prefill_token_s * prefill_tokens)
             * engine_slowdown / gpu.speed()

where ``overhead`` is the time to stream the weights once from HBM and the per-token costs are
calibrated (see ``Deployment``) so that a GPU saturated with MLPerf's Llama2-70B OpenOrca shape
produces exactly the profile's published output tokens/s times ``gpu.speed()``.
``gpu.speed()`` (node variation, power cap, thermal throttle, NVLink health) is read at the
start of every iteration, so an injected fault acts on the next step.

Memory: weights at the precision each family runs in MLPerf (FP8 on Hopper, NVFP4 on
Blackwell) plus a KV cache sized like TensorRT-LLM's (90 % of what is left). Requests reserve
their whole KV footprint (prompt + max output tokens) when admitted, as TensorRT-LLM's
guaranteed-no-evict scheduler does; they wait in a FIFO queue, shared by the engine's GPUs,
while no GPU has room. The GPU model is told the KV actually written so far, so memory rises
with load.

Cost: one heap entry and O(1) work per iteration, O(1) per request. A request finishing after
``n`` tokens is filed in a bucket keyed by the iteration it finishes in, so no iteration walks
the batch. Only requests that ask for token streaming (``stream_tokens``) get a ``Tokens``
event per iteration; everyone else sees ``FirstToken`` and ``Done``.

Time: on a wall clock one timer per engine fires at the earliest iteration end. On a
``VirtualClock`` nothing runs by itself; ``run_until`` / ``step`` / ``run_until_idle`` move
the clock from one iteration end to the next, so tests simulate minutes in milliseconds;
``run_engines_until`` does the same for several engines sharing one clock (a simulated rack).

The package:

- ``deployment``: Llama2-70B's size and the serving runtime's defaults; ``deployment_for``
  sizes the KV cache and calibrates the step cost of one GPU.
- ``jobs``: ``SimJob``, one request's state and KV reservation, and ``EventChannel``, which
  hands a request's events to one async reader.
- ``scheduler``: ``BatchScheduler``, the shared queue and each GPU's iteration loop
  (admission, warm start, step cost, completion, dropped GPUs).
- ``engine``: ``SimEngine``, the ``Engine`` protocol and the capabilities it declares, the
  wall-clock timer and virtual-time stepping; ``run_engines_until`` for a simulated rack.
"""

from __future__ import annotations

from rackscope.runner.engines.sim.deployment import (
    BYTES_PER_PARAM,
    DEFAULT_MAX_NUM_TOKENS,
    HBM_BYTES_PER_S,
    KV_BATCH_HEADROOM,
    KV_BYTES_PER_ELEMENT,
    KV_BYTES_PER_TOKEN,
    KV_CACHE_FRACTION,
    LLAMA2_70B_EMBEDDING_PARAMS,
    LLAMA2_70B_HEAD_DIM,
    LLAMA2_70B_HIDDEN,
    LLAMA2_70B_KV_HEADS,
    LLAMA2_70B_LAYERS,
    LLAMA2_70B_PARAMS,
    LLAMA2_MAX_SEQ_LEN,
    MAX_BATCH_LIMIT,
    MAX_OVERHEAD_SHARE,
    MLPERF_MEAN_INPUT_TOKENS,
    MLPERF_MEAN_OUTPUT_TOKENS,
    NVLINK_BYTES_PER_TOKEN,
    PREFILL_TOKEN_COST,
    RUNTIME_RESERVE_BYTES,
    TP_GROUP,
    UTILIZATION_FLOOR,
    WEIGHT_PRECISION,
    Deployment,
    deployment_for,
)
from rackscope.runner.engines.sim.engine import CHARS_PER_TOKEN, TIMER_SLACK_S, SimEngine, run_engines_until
from rackscope.runner.engines.sim.jobs import EventChannel, SimJob
from rackscope.runner.engines.sim.scheduler import MAX_LAG_S, MIN_SPEED

__all__ = [
    "BYTES_PER_PARAM",
    "CHARS_PER_TOKEN",
    "DEFAULT_MAX_NUM_TOKENS",
    "HBM_BYTES_PER_S",
    "KV_BATCH_HEADROOM",
    "KV_BYTES_PER_ELEMENT",
    "KV_BYTES_PER_TOKEN",
    "KV_CACHE_FRACTION",
    "LLAMA2_70B_EMBEDDING_PARAMS",
    "LLAMA2_70B_HEAD_DIM",
    "LLAMA2_70B_HIDDEN",
    "LLAMA2_70B_KV_HEADS",
    "LLAMA2_70B_LAYERS",
    "LLAMA2_70B_PARAMS",
    "LLAMA2_MAX_SEQ_LEN",
    "MAX_BATCH_LIMIT",
    "MAX_LAG_S",
    "MAX_OVERHEAD_SHARE",
    "MIN_SPEED",
    "MLPERF_MEAN_INPUT_TOKENS",
    "MLPERF_MEAN_OUTPUT_TOKENS",
    "NVLINK_BYTES_PER_TOKEN",
    "PREFILL_TOKEN_COST",
    "RUNTIME_RESERVE_BYTES",
    "TIMER_SLACK_S",
    "TP_GROUP",
    "UTILIZATION_FLOOR",
    "WEIGHT_PRECISION",
    "Deployment",
    "EventChannel",
    "SimEngine",
    "SimJob",
    "deployment_for",
    "run_engines_until",
]
