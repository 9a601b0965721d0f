"""A local PyTorch/transformers engine: real tokens from a Hugging Face causal LM, batched.

It exists so a machine without TensorRT-LLM or a server still runs a real workload: the
same model code TensorRT-LLM would serve, on the CPU or a CUDA GPU. This is the only module
that imports ``torch`` and ``transformers``, and only in ``start``.

How it batches (static batching, kept simple on purpose): one background thread owns the
model. It takes up to ``max_batch`` waiting requests (waiting up to ``batch_wait_s`` for the
batch to fill once the first has arrived), left-pads their prompts into one
batch, runs one prefill forward pass and then one decode forward pass per step for the whole
batch, reusing the KV cache the model returns. Each step produces exactly one token per
running request (greedy), so token counts are exact. Requests that finish (their
``max_output_tokens``, or EOS when ``ignore_eos`` is off) leave the batch and their rows are
dropped from the cache; requests that arrive meanwhile wait for the next batch. Events are
handed to the caller's event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from rackscope.clock import Clock, WallClock
from rackscope.errors import EngineError, EngineUnavailable
from rackscope.runner.engines.base import Done, EngineEvent, Failed, FirstToken, Request, Tokens

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install rackscope[torch] (torch and transformers); see docs/real-nodes.md"
DEFAULT_MAX_BATCH = 8
# How long a batch waits for more requests once the first has arrived, unless it is full.
# Requests issued together (an offline burst, a concurrency ramp) reach the worker a few at
# a time; without a short wait the first batch would often hold just one of them.
DEFAULT_BATCH_WAIT_S = 0.01
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class _Job:
    """One request in flight between the caller's event loop and the worker thread."""

    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineEvent]
    prompt_ids: list[int] = field(default_factory=list)
    generated: int = 0
    cancelled: bool = False  # set from the loop thread when the caller walks away
    finished: bool = False  # a Done or Failed was posted

    def post(self, event: EngineEvent) -> None:
        self.finished = self.finished or isinstance(event, Done | Failed)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled = True


def is_available() -> bool:
    """True when torch and transformers are importable here (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise EngineUnavailable(f"the hf engine needs {name} ({exc}); hint: {INSTALL_HINT}") from exc


class HfEngine:
    """A transformers causal LM generating real tokens, batched in a background thread.

    ``model`` is a local path or hub id to load with ``AutoModelForCausalLM``, or an
    already-built model (then pass ``tokenizer`` too, or send token-id prompts only).
    ``dtype`` is one of ``auto`` (float32 on the CPU, bfloat16 on a GPU), ``float32``,
    ``float16``, ``bfloat16``.
    """

    name = "hf"

    def __init__(
        self,
        model: str | Any,
        tokenizer: Any | None = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        model_name: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must not be negative, not {batch_wait_s}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if not (device in {"cpu", "cuda"} or device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
        self._source = model
        self._tokenizer = tokenizer
        self.model = model if isinstance(model, str) else model_name or _model_name(model)
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._clock: Clock = clock or WallClock()
        self._torch: Any = None
        self._transformers: Any = None
        self._model: Any = None
        self._gpu: int | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._max_positions: int | None = None
        self._cache_kwarg = "past_key_values"
        self._logits_kwarg: str | None = None
        self._pending: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return self._clock.now()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        torch = _import("torch")
        transformers = _import("transformers")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"device {self.device} requested but torch sees no CUDA GPU here; use --device cpu")
        dtype = self._torch_dtype(torch)
        # Loading reads weights from disk: seconds to minutes, off the event loop.
        await asyncio.to_thread(self._load, torch, transformers, dtype)
        self._torch = torch
        self._transformers = transformers
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"hf-engine-{self.model}", daemon=True)
        self._thread.start()
        log.info("hf engine ready: %s on %s (%s, batches of up to %d)", self.model, self.device, dtype, self.max_batch)

    def _torch_dtype(self, torch: Any) -> Any:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def _load(self, torch: Any, transformers: Any, dtype: Any) -> None:
        if isinstance(self._source, str):
            # transformers 5 renamed torch_dtype to dtype.
            dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(self._source, **{dtype_kwarg: dtype})
            except (OSError, ValueError) as exc:
                raise EngineUnavailable(
                    f"cannot load model {self._source!r} with transformers: {exc} "
                    "(give a local model directory or a hub id that is cached or downloadable)"
                ) from exc
            if self._tokenizer is None:
                try:
                    self._tokenizer = transformers.AutoTokenizer.from_pretrained(self._source)
                except (OSError, ValueError) as exc:
                    log.warning("no tokenizer for %s (%s): only token-id prompts will work", self._source, exc)
            model = model.to(self.device)
        else:
            model = self._source.to(self.device) if self.dtype == "auto" else self._source.to(self.device, dtype)
        model.eval()
        self._model = model
        self._gpu = (torch.device(self.device).index or 0) if self.device.startswith("cuda") else None
        self._eos_ids = _eos_ids(model, self._tokenizer)
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        # Newer transformers name forward()'s cache argument "cache"; older ones "past_key_values".
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in parameters), None)

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        await asyncio.to_thread(thread.join)
        for job in self._drain_pending():
            job.post(Failed(self.now(), "cancelled", "the hf engine stopped"))

    def _drain_pending(self) -> list[_Job]:
        with self._wakeup:
            jobs = list(self._pending)
            self._pending.clear()
        return jobs

    # ------------------------------------------------------------ requests

    async def stream(self, request: Request) -> AsyncGenerator[EngineEvent, None]:
        if self._thread is None:
            raise EngineError("the hf engine is not started")
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._wakeup:
            self._pending.append(job)
            self._wakeup.notify()
        try:
            while True:
                event = await job.queue.get()
                yield event
                if isinstance(event, Done | Failed):
                    return
        finally:
            job.cancelled = True  # a no-op once done; frees the batch row if the caller left early

    # ------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._pending) < self.max_batch and not self._stopping:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        break
                    self._wakeup.wait(remaining_s)
                if self._stopping:
                    return
                jobs = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            try:
                self._run_batch(jobs)
            # Thread boundary: a failed forward pass fails this batch's requests, logged, and
            # the worker goes on with the next batch rather than dying silently.
            except Exception as exc:
                log.exception("hf engine batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.finished:
                        job.post(Failed(self.now(), "engine", f"generation failed: {exc}", job.generated))

    def _prepare(self, job: _Job) -> bool:
        """Tokenize and check one request; post Failed and return False when it cannot run."""
        request = job.request
        if request.input_ids is not None:
            job.prompt_ids = list(request.input_ids)
        elif request.prompt is not None and self._tokenizer is not None:
            job.prompt_ids = list(self._tokenizer(request.prompt)["input_ids"])
        elif request.prompt is not None:
            job.post(Failed(self.now(), "engine", f"model {self.model} has no tokenizer: send input_ids"))
            return False
        if not job.prompt_ids:
            job.post(Failed(self.now(), "engine", f"request {request.request_id} has an empty prompt"))
            return False
        total = len(job.prompt_ids) + request.max_output_tokens
        if self._max_positions is not None and total > self._max_positions:
            job.post(
                Failed(
                    self.now(),
                    "engine",
                    f"{len(job.prompt_ids)} prompt + {request.max_output_tokens} output tokens exceed "
                    f"the model's {self._max_positions} positions",
                )
            )
            return False
        if request.max_output_tokens < 1:
            job.post(Done(self.now(), input_tokens=len(job.prompt_ids), output_tokens=0, gpu=self._gpu))
            return False
        return True

    def _forward(self, **kwargs: Any) -> tuple[Any, Any]:
        """One forward pass; returns (last-position logits, the updated KV cache)."""
        if self._logits_kwarg is not None:
            kwargs[self._logits_kwarg] = 1  # only the last position's logits are needed
        output = self._model(use_cache=True, **kwargs)
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        if isinstance(cache, tuple):
            # transformers 4.4x hands back the legacy tuple when it was not given a Cache.
            cache = self._transformers.DynamicCache.from_legacy_cache(cache)
        return output["logits"][:, -1, :], cache

    def _run_batch(self, jobs: list[_Job]) -> None:
        torch = self._torch
        running = [job for job in jobs if not job.cancelled and self._prepare(job)]
        if not running:
            return
        width = max(len(job.prompt_ids) for job in running)
        device = self._model.device
        input_ids = torch.zeros((len(running), width), dtype=torch.long)
        mask = torch.zeros((len(running), width), dtype=torch.long)
        for row, job in enumerate(running):
            # Left padding keeps every row's newest token in the last column.
            input_ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[row, width - len(job.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        with torch.inference_mode():
            logits, cache = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions)
            positions = positions[:, -1:]
            first = True
            while running:
                next_ids = logits.argmax(dim=-1)
                t = self.now()
                keep: list[int] = []
                for row, job in enumerate(running):
                    if job.cancelled:
                        continue
                    job.generated += 1
                    job.post(FirstToken(t, 1, self._gpu) if first else Tokens(t, 1))
                    eos = not job.request.ignore_eos and int(next_ids[row]) in self._eos_ids
                    if eos or job.generated >= job.request.max_output_tokens:
                        job.post(Done(t, len(job.prompt_ids), job.generated, "engine", self._gpu))
                    else:
                        keep.append(row)
                first = False
                if not keep:
                    return
                if self._stopping:
                    for row in keep:
                        running[row].post(Failed(t, "cancelled", "the hf engine stopped", running[row].generated))
                    return
                if len(keep) < len(running):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.batch_select_indices(index)
                    running = [running[row] for row in keep]
                    next_ids, mask, positions = next_ids[index], mask[index], positions[index]
                mask = torch.cat([mask, mask.new_ones((len(running), 1))], dim=-1)
                positions = positions + 1
                logits, cache = self._forward(
                    input_ids=next_ids[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    **{self._cache_kwarg: cache},
                )


def _model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or type(model).__name__)


def _eos_ids(model: Any, tokenizer: Any | None) -> frozenset[int]:
    """Every id that ends a sequence: generation config, model config, then tokenizer."""
    holders = [getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer]
    for holder in holders:
        value = getattr(holder, "eos_token_id", None)
        if value is None:
            continue
        ids = value if isinstance(value, list | tuple) else [value]
        return frozenset(int(i) for i in ids)
    return frozenset()
