"""The in-process TensorRT-LLM engine: the LLM API's streaming generation as rackscope events.

This is the only module that imports ``tensorrt_llm``. The import happens in ``start`` so
that rackscope installs and runs without it; a machine without it gets one clear
``EngineUnavailable`` with a hint.

What the LLM API gives us (TensorRT-LLM ``tensorrt_llm.LLM``):
- ``generate_async(inputs, sampling_params=SamplingParams(max_tokens=..., ignore_eos=...),
  streaming=True)`` returns a ``RequestOutput`` that is its own async iterator; every step
  yields the same object, updated. ``outputs[0].token_ids`` holds all tokens generated so
  far (``length`` is its size), ``finished`` turns True on the last step, and
  ``prompt_token_ids`` is the tokenized prompt. ``inputs`` is a prompt string or a list of
  token ids.
- ``get_stats(timeout)`` / ``get_stats_async(timeout)`` drain per-iteration runtime
  statistics (``kvCacheStats``, ``inflightBatchingStats``, ``numActiveRequests``...), as
  dicts or JSON strings depending on the version: the records ``trtllm-serve`` shows on its
  JSON ``/metrics`` page. They need ``enable_iter_perf_stats=True`` on the PyTorch backend,
  which this engine sets unless told otherwise. They feed the run's ``server`` view
  (``ReportsIterationStats.iteration_reading``: running and queued requests, KV-cache usage,
  drained about once a second while the run lasts, ``runner.server_view``), and
  ``iteration_stats``, a fuller summary of one drain.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from rackscope.clock import Clock, WallClock
from rackscope.engine_metrics.formats import Reading, read_iteration_records
from rackscope.errors import EngineError, EngineUnavailable, PeerError
from rackscope.runner.engines.base import (
    Done,
    EngineEvent,
    Failed,
    FirstToken,
    ReportsIterationStats,
    Request,
    Tokens,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install rackscope[trtllm] from NVIDIA's index, or use NVIDIA's NGC TensorRT-LLM "
    "container; see docs/real-nodes.md"
)
# TensorRT-LLM's own default share of free GPU memory given to the KV cache after the
# weights are loaded (KvCacheConfig.free_gpu_memory_fraction).
DEFAULT_KV_CACHE_FRACTION = 0.9
DEFAULT_STATS_TIMEOUT_S = 2.0
# A drain for the run's server view, once a second: short, so that the reading it stamps is
# close to the moment its latest record stands for.
READING_TIMEOUT_S = 0.25
MS_PER_S = 1000.0


def is_available() -> bool:
    """True when the ``tensorrt_llm`` package is importable here (without importing it)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def import_tensorrt_llm() -> Any:
    """Import ``tensorrt_llm`` or raise ``EngineUnavailable`` with the install hint."""
    try:
        return importlib.import_module("tensorrt_llm")
    # A wheel without its CUDA libraries fails with OSError (missing .so) or RuntimeError.
    except (ImportError, OSError, RuntimeError) as exc:
        raise EngineUnavailable(f"TensorRT-LLM is not usable here ({exc}); hint: {INSTALL_HINT}") from exc


class TrtllmEngine(ReportsIterationStats):
    """TensorRT-LLM's LLM API, in process.

    ``module`` is the ``tensorrt_llm`` module to use; by default it is imported in
    ``start``. Passing one in is how the translation from the LLM API's output objects to
    our events is tested on machines without a GPU.
    """

    name = "trtllm"

    def __init__(
        self,
        model: str,
        tp: int = 1,
        backend: str = "pytorch",
        kv_cache_fraction: float | None = DEFAULT_KV_CACHE_FRACTION,
        *,
        module: Any | None = None,
        clock: Clock | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if tp < 1:
            raise ValueError(f"tp must be at least 1, not {tp}")
        if kv_cache_fraction is not None and not 0.0 < kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], not {kv_cache_fraction}")
        self.model = model
        self.tp = tp
        self.backend = backend
        self.kv_cache_fraction = kv_cache_fraction
        self.llm_kwargs = llm_kwargs
        self._module = module
        self._clock: Clock = clock or WallClock()
        self._llm: Any | None = None

    def now(self) -> float:
        return self._clock.now()

    def llm_arguments(self, module: Any) -> dict[str, Any]:
        """The keyword arguments ``tensorrt_llm.LLM`` is built with."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tensor_parallel_size": self.tp,
            "backend": self.backend,
        }
        if self.backend == "pytorch":
            # Without it the PyTorch backend keeps no iteration stats for get_stats().
            kwargs["enable_iter_perf_stats"] = True
        if self.kv_cache_fraction is not None:
            kwargs["kv_cache_config"] = _kv_cache_config(module, self.kv_cache_fraction)
        kwargs.update(self.llm_kwargs)
        return kwargs

    async def start(self) -> None:
        if self._llm is not None:
            return
        module = self._module if self._module is not None else import_tensorrt_llm()
        self._module = module
        kwargs = self.llm_arguments(module)
        log.info("loading %s with TensorRT-LLM (backend %s, tp %d)", self.model, self.backend, self.tp)
        try:
            # Built on the calling thread, as trtllm-serve and trtllm-bench do: the LLM API sets
            # up its executor, MPI workers and result queues there. Loading takes minutes for a
            # large model and holds the event loop meanwhile; nothing is measured yet then.
            self._llm = module.LLM(**kwargs)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise EngineUnavailable(f"TensorRT-LLM could not load model {self.model!r}: {exc}") from exc

    async def stop(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None and hasattr(llm, "shutdown"):
            await asyncio.to_thread(llm.shutdown)

    def _started(self) -> tuple[Any, Any]:
        if self._llm is None or self._module is None:
            raise EngineError("the trtllm engine is not started")
        return self._llm, self._module

    async def stream(self, request: Request) -> AsyncGenerator[EngineEvent, None]:
        llm, module = self._started()
        inputs: str | list[int]
        if request.input_ids is not None:
            inputs = list(request.input_ids)
        elif request.prompt is not None:
            inputs = request.prompt
        else:
            yield Failed(self.now(), "engine", f"request {request.request_id} has neither prompt nor input_ids")
            return
        try:
            params = module.SamplingParams(max_tokens=request.max_output_tokens, ignore_eos=request.ignore_eos)
            result = llm.generate_async(inputs, sampling_params=params, streaming=True)
        # RequestError is a RuntimeError; argument validation raises ValueError/TypeError.
        except (RuntimeError, ValueError, TypeError) as exc:
            yield Failed(self.now(), "engine", f"TensorRT-LLM rejected the request: {exc}")
            return

        seen = 0
        finished = False
        try:
            while True:
                try:
                    output = await result.__anext__()
                except StopAsyncIteration:
                    break
                except (RuntimeError, ValueError) as exc:
                    yield Failed(self.now(), "engine", f"TensorRT-LLM failed the request: {exc}", output_tokens=seen)
                    return
                t = self.now()
                # token_ids is cumulative: the new tokens are what lies past the last count.
                count = _output_length(output)
                if count > seen:
                    yield FirstToken(t, count - seen) if seen == 0 else Tokens(t, count - seen)
                    seen = count
                if getattr(output, "finished", False):
                    finished = True
                    input_tokens = len(getattr(output, "prompt_token_ids", None) or []) or request.input_tokens
                    yield Done(t, input_tokens=input_tokens, output_tokens=seen, output_tokens_method="engine")
                    return
            yield Failed(self.now(), "protocol", "TensorRT-LLM stream ended before the request finished", seen)
        finally:
            if not finished:
                _abort(result)

    async def iteration_stats(self, timeout_s: float = DEFAULT_STATS_TIMEOUT_S) -> dict[str, Any]:
        """Drain the runtime's iteration statistics and summarise them (``summarize_iteration_stats``).

        Not ``stats``: that name is the ``ReportsStats`` capability (a synchronous
        ``EngineStats``), which this engine does not offer."""
        return summarize_iteration_stats(await self._drain_stats(timeout_s))

    async def iteration_reading(self, timeout_s: float = READING_TIMEOUT_S) -> Reading | None:
        """Drain the runtime's iteration statistics into a reading of its latest state, as
        ``trtllm-serve``'s JSON page reads (None: no iteration since the last drain)."""
        records = await self._drain_stats(timeout_s)
        if not records:
            return None
        try:
            return read_iteration_records(records, model=self.model, what="TensorRT-LLM")
        except PeerError as exc:
            raise EngineError(f"TensorRT-LLM reported statistics that cannot be read: {exc}") from exc

    async def _drain_stats(self, timeout_s: float) -> list[Any]:
        """The iteration-stat records gathered since the last drain, oldest first."""
        llm, _ = self._started()
        if self.backend == "pytorch" and self.llm_kwargs.get("enable_iter_perf_stats") is False:
            raise EngineError("TensorRT-LLM keeps no iteration statistics: enable_iter_perf_stats is off")
        try:
            if hasattr(llm, "get_stats_async"):
                return [record async for record in llm.get_stats_async(timeout=timeout_s)]
            if hasattr(llm, "get_stats"):
                return list(await asyncio.to_thread(llm.get_stats, timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"TensorRT-LLM could not report its statistics: {exc}") from exc
        raise EngineError("this TensorRT-LLM release has no get_stats to report statistics with")


def _kv_cache_config(module: Any, fraction: float) -> Any:
    """A ``KvCacheConfig`` when the module exports one, else the equivalent plain dict."""
    kv_cache_config = getattr(module, "KvCacheConfig", None) or getattr(
        getattr(module, "llmapi", None), "KvCacheConfig", None
    )
    if kv_cache_config is None:
        return {"free_gpu_memory_fraction": fraction}
    return kv_cache_config(free_gpu_memory_fraction=fraction)


def _output_length(output: Any) -> int:
    outputs = getattr(output, "outputs", None) or []
    if not outputs:
        return 0
    first = outputs[0]
    token_ids = getattr(first, "token_ids", None)
    return len(token_ids) if token_ids is not None else int(getattr(first, "length", 0))


def _abort(result: Any) -> None:
    """Free the runtime's slot for a request the caller walked away from."""
    abort = getattr(result, "abort", None)
    if abort is None:
        return
    try:
        abort()
    # The request may already be gone from the executor; nothing is left to free then.
    except (RuntimeError, AssertionError, AttributeError) as exc:
        log.debug("abort of an unfinished TensorRT-LLM request failed: %s", exc)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_iteration_stats(records: Sequence[Mapping[str, Any] | str]) -> dict[str, Any]:
    """Our plain shape for a batch of TensorRT-LLM iteration-stat records.

    Gauges (active requests, KV-cache blocks) come from the latest record; latency and
    batch size are means over the records drained. Fields the runtime did not report are
    None. Shape::

        {"iterations": int, "iter_latency_s_mean": float|None,
         "active_requests": int|None, "queued_requests": int|None,
         "gpu_memory_used_bytes": int|None,
         "kv_cache": {"blocks_max", "blocks_free", "blocks_used", "tokens_per_block",
                      "usage_ratio", "hit_rate", "blocks_reused", "blocks_missed"} | None,
         "inflight_batching": {"scheduled_requests", "scheduled_requests_mean",
                               "context_requests", "generation_requests",
                               "paused_requests", "context_tokens"} | None}
    """
    parsed: list[Mapping[str, Any]] = []
    for raw in records:
        try:
            record = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise EngineError(f"TensorRT-LLM iteration stats are not JSON: {exc}") from exc
        if isinstance(record, Mapping):
            parsed.append(record)
    latest: Mapping[str, Any] = parsed[-1] if parsed else {}
    latencies_s = [v / MS_PER_S for r in parsed if (v := _number(r.get("iterLatencyMS"))) is not None]

    kv_cache: dict[str, Any] | None = None
    kv = next((r["kvCacheStats"] for r in reversed(parsed) if isinstance(r.get("kvCacheStats"), Mapping)), None)
    if kv is not None:
        blocks_max = _integer(kv.get("maxNumBlocks"))
        blocks_used = _integer(kv.get("usedNumBlocks"))
        kv_cache = {
            "blocks_max": blocks_max,
            "blocks_free": _integer(kv.get("freeNumBlocks")),
            "blocks_used": blocks_used,
            "tokens_per_block": _integer(kv.get("tokensPerBlock")),
            "usage_ratio": blocks_used / blocks_max if blocks_used is not None and blocks_max else None,
            "hit_rate": _number(kv.get("cacheHitRate")),
            "blocks_reused": _integer(kv.get("reusedBlocks")),
            "blocks_missed": _integer(kv.get("missedBlocks")),
        }

    inflight: dict[str, Any] | None = None
    batching = [r["inflightBatchingStats"] for r in parsed if isinstance(r.get("inflightBatchingStats"), Mapping)]
    if batching:
        last = batching[-1]
        scheduled = [v for b in batching if (v := _number(b.get("numScheduledRequests"))) is not None]
        inflight = {
            "scheduled_requests": _integer(last.get("numScheduledRequests")),
            "scheduled_requests_mean": _mean(scheduled),
            "context_requests": _integer(last.get("numContextRequests")),
            "generation_requests": _integer(last.get("numGenRequests")),
            "paused_requests": _integer(last.get("numPausedRequests")),
            "context_tokens": _integer(last.get("numCtxTokens")),
        }

    return {
        "iterations": len(parsed),
        "iter_latency_s_mean": _mean(latencies_s),
        "active_requests": _integer(latest.get("numActiveRequests")),
        "queued_requests": _integer(latest.get("numQueuedRequests")),
        "gpu_memory_used_bytes": _integer(latest.get("gpuMemUsage")),
        "kv_cache": kv_cache,
        "inflight_batching": inflight,
    }
