"""Inference servers' own metrics pages (vLLM, SGLang, TensorRT-LLM) read onto one small contract.

Each server names the same few facts differently; this module is the only one that knows how
(vLLM names carry ``vllm:``, SGLang ``sglang:``, TensorRT-LLM's Prometheus page ``trtllm_``):

- running requests: vLLM ``num_requests_running``; SGLang ``num_running_reqs`` (first releases:
  ``num_requests_running``); ``trtllm-serve`` ``numActiveRequests`` (JSON) or
  ``trtllm_num_requests_running``.
- waiting requests: vLLM ``num_requests_waiting``; SGLang ``num_queue_reqs`` (first releases:
  ``num_requests_waiting``); ``numQueuedRequests`` or ``trtllm_num_requests_waiting``.
- KV-cache usage, a fraction 0-1: vLLM ``kv_cache_usage_perc`` (v0 and early v1:
  ``gpu_cache_usage_perc``); SGLang ``token_usage``; ``kvCacheStats.usedNumBlocks /
  maxNumBlocks`` (the ratio TensorRT-LLM's own collector exports) or ``trtllm_kv_cache_utilization``.
- input and output tokens, server-counted: ``prompt_tokens_total`` and
  ``generation_tokens_total`` (all three; not in TensorRT-LLM's JSON).
- TTFT and ITL histograms: ``time_to_first_token_seconds``, and ``inter_token_latency_seconds``
  or else ``time_per_output_token_seconds`` (TensorRT-LLM: the latter only).

The model is the ``model_name`` label (SGLang's first releases: ``name``); a page without one
(TensorRT-LLM's JSON) is credited to the model the caller names. vLLM's ``_perc`` gauges are
fractions despite the name. ``trtllm-serve`` answers ``GET /metrics`` with a JSON list of the
iteration statistics gathered since the last read (empty when nothing ran since), and, when
started with ``return_perf_metrics``, Prometheus text on ``/prometheus/metrics``. The same
records drained in process from the LLM API's ``get_stats`` read alike (``read_iteration_records``).

Several series of one model (vLLM's ``engine``, SGLang's ``dp_rank``: data-parallel replicas)
are combined: counts and tokens summed, KV-cache usage averaged (the replicas hold caches of
one size, so the mean is the fraction of the whole).

Traps kept out: ``*_created`` series (timestamps), histogram ``_sum`` of prompt tokens,
SGLang's ``cached_tokens_total`` (a part of the prompt tokens, not all of them), vLLM's CPU
cache gauge. A value that cannot be a count or a fraction (negative, NaN, a KV usage above 1)
makes the whole page an error rather than a number.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from rackscope.errors import PeerError


class EngineFormat(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM = "trtllm"


FORMATS = tuple(f.value for f in EngineFormat)
UNKNOWN_MODEL = "unknown"  # the model of a page that names none, when the caller names none either


@dataclass(frozen=True, slots=True)
class Histogram:
    """A server's cumulative histogram: upper bounds (the last +Inf) and cumulative counts."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float
    count: float


@dataclass(frozen=True, slots=True)
class ModelReading:
    """What one page said about one model. None: the page did not say (never zero for that)."""

    model: str
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # fraction 0-1
    input_tokens: float | None = None  # cumulative, server-counted
    output_tokens: float | None = None  # cumulative, server-counted
    ttft_s: Histogram | None = None
    itl_s: Histogram | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """One page, understood. ``models`` is empty when the page said nothing about any model
    (TensorRT-LLM's ``[]``: no iteration since the last read)."""

    format: EngineFormat
    models: tuple[ModelReading, ...]


# --- Prometheus text names -------------------------------------------------------------------
@dataclass(frozen=True)
class _Names:
    """A text format's series names, each list in order of preference (first present wins)."""

    prefix: str
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    kv_usage: tuple[str, ...]
    input_tokens: tuple[str, ...]  # sample names of counters
    output_tokens: tuple[str, ...]
    ttft: tuple[str, ...]  # histogram family names
    itl: tuple[str, ...]


_TEXT_NAMES = {
    EngineFormat.VLLM: _Names(
        prefix="vllm:",
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        input_tokens=("vllm:prompt_tokens_total",),
        output_tokens=("vllm:generation_tokens_total",),
        ttft=("vllm:time_to_first_token_seconds",),
        itl=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    ),
    EngineFormat.SGLANG: _Names(
        prefix="sglang:",
        running=("sglang:num_running_reqs", "sglang:num_requests_running"),
        waiting=("sglang:num_queue_reqs", "sglang:num_requests_waiting"),
        kv_usage=("sglang:token_usage",),
        input_tokens=("sglang:prompt_tokens_total",),
        output_tokens=("sglang:generation_tokens_total",),
        ttft=("sglang:time_to_first_token_seconds",),
        itl=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    ),
    EngineFormat.TRTLLM: _Names(
        prefix="trtllm_",
        running=("trtllm_num_requests_running",),
        waiting=("trtllm_num_requests_waiting",),
        kv_usage=("trtllm_kv_cache_utilization",),
        input_tokens=("trtllm_prompt_tokens_total",),
        output_tokens=("trtllm_generation_tokens_total",),
        ttft=("trtllm_time_to_first_token_seconds",),
        itl=("trtllm_time_per_output_token_seconds",),
    ),
}
# Where the model is named; every other label (replica, rank, process) is combined away.
_MODEL_LABELS = ("model_name", "name")
_KV_SLACK = 1e-9  # float noise allowed above 1.0 in a fraction
# Buckets one histogram may have: vLLM's TTFT has 22, and every bucket is kept per reading.
MAX_BUCKETS = 256


def read_page(
    body: bytes,
    *,
    content_type: str | None = None,
    fmt: EngineFormat | None = None,
    model: str | None = None,
    what: str = "the inference server",
) -> Reading:
    """A metrics page -> a ``Reading``; ``fmt`` None detects the format from the page.

    Raises ``PeerError`` for a page that is not valid UTF-8, not Prometheus text or JSON, of
    no known format (or not of ``fmt``), or that carries a value no count or fraction can be."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PeerError(f"{what} sent a metrics page that is not UTF-8 text") from exc
    default_model = model or UNKNOWN_MODEL
    if _looks_like_json(text, content_type):
        if fmt not in (None, EngineFormat.TRTLLM):
            raise PeerError(f"{what} sent JSON, not the {fmt} Prometheus page expected")
        return _read_iteration_stats(text, default_model, what)
    samples = _parse_text(text, what)
    detected = _detect(samples, what)
    if fmt is not None and detected is not fmt:
        raise PeerError(f"{what} sent a {detected} metrics page, not the {fmt} page expected")
    return _read_text(samples, _TEXT_NAMES[detected], detected, default_model, what)


def detect(body: bytes, content_type: str | None = None) -> EngineFormat:
    """The format of a page, from the page alone (``PeerError`` when none fits)."""
    return read_page(body, content_type=content_type).format


def _looks_like_json(text: str, content_type: str | None) -> bool:
    if content_type is not None and content_type.split(";")[0].strip().lower() == "application/json":
        return True
    return text.lstrip()[:1] in ("[", "{")


# --- TensorRT-LLM iteration statistics (JSON) ----------------------------------------------------
def _read_iteration_stats(text: str, model: str, what: str) -> Reading:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PeerError(f"{what} sent JSON that does not parse: {exc}") from exc
    if not isinstance(doc, list):
        raise PeerError(f"{what} sent JSON that is not a list of iteration statistics")
    return _iteration_reading(doc, model, what)


def read_iteration_records(
    records: Iterable[object], *, model: str | None = None, what: str = "the TensorRT-LLM runtime",
) -> Reading:
    """Iteration statistics as the LLM API's ``get_stats`` / ``get_stats_async`` hand them over
    (each a dict, or a JSON string in some releases) -> a ``Reading``, as the same records on
    ``trtllm-serve``'s JSON page read. No records: a reading of no model (nothing ran since the
    last drain). Raises ``PeerError`` for a record that is not a JSON object of such statistics."""
    decoded: list[object] = []
    for record in records:
        if isinstance(record, str | bytes):
            try:
                decoded.append(json.loads(record))
            except (ValueError, RecursionError) as exc:
                raise PeerError(f"{what} sent an iteration statistic that is not JSON: {exc}") from exc
        else:
            decoded.append(record)
    return _iteration_reading(decoded, model or UNKNOWN_MODEL, what)


def _iteration_reading(doc: list[object], model: str, what: str) -> Reading:
    """The latest of a batch of iteration statistics (the page's list, or records drained)."""
    items = [item for item in doc if isinstance(item, dict)]
    if len(items) != len(doc):
        raise PeerError(f"{what} sent JSON that is not a list of iteration statistics")
    if not items:
        return Reading(EngineFormat.TRTLLM, ())
    # The list holds the iterations since the last read, oldest first; the latest one is now.
    latest = max(items, key=lambda item: _iteration(item, what))
    running = _count(latest.get("numActiveRequests"), "numActiveRequests", what)
    waiting = _count(latest.get("numQueuedRequests"), "numQueuedRequests", what)
    kv_usage = None
    kv = latest.get("kvCacheStats")
    if kv is not None:
        if not isinstance(kv, dict):
            raise PeerError(f"{what} sent a kvCacheStats that is not an object")
        used = _count(kv.get("usedNumBlocks"), "kvCacheStats.usedNumBlocks", what)
        total = _count(kv.get("maxNumBlocks"), "kvCacheStats.maxNumBlocks", what)
        if used is not None and total:
            kv_usage = _fraction(used / total, "kvCacheStats.usedNumBlocks / maxNumBlocks", what)
    return Reading(EngineFormat.TRTLLM, (ModelReading(model, running, waiting, kv_usage),))


def _iteration(item: Mapping[str, object], what: str) -> float:
    value = item.get("iter")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PeerError(f"{what} sent an iteration statistic without a numeric 'iter'")
    return float(value)


def _count(value: object, name: str, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PeerError(f"{what} sent {name} = {value!r}, not a number")
    if not math.isfinite(value) or value < 0:
        raise PeerError(f"{what} sent {name} = {value!r}, which no count can be")
    return float(value)


def _fraction(value: float, name: str, what: str) -> float:
    if not math.isfinite(value) or value < 0 or value > 1 + _KV_SLACK:
        raise PeerError(f"{what} sent {name} = {value!r}, which is not a fraction between 0 and 1")
    return min(value, 1.0)


# --- Prometheus text ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Sample:
    family: str
    family_type: str
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def _parse_text(text: str, what: str) -> list[_Sample]:
    # Imported on the first page read: prometheus_client's package pulls in an HTTP server and
    # the email package, start-up a load generator with no page to read should not pay for.
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return [
            _Sample(family.name, family.type, s.name, tuple(sorted(s.labels.items())), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise PeerError(f"{what} sent a page that is not Prometheus text: {exc}") from exc


def _detect(samples: Iterable[_Sample], what: str) -> EngineFormat:
    found = {fmt for s in samples for fmt, names in _TEXT_NAMES.items() if s.name.startswith(names.prefix)}
    if len(found) > 1:
        raise PeerError(f"{what} sent a page with the series of {' and '.join(sorted(found))}: which is it?")
    if not found:
        raise PeerError(f"{what} sent a page of none of {', '.join(FORMATS)}: no vllm:, sglang: or trtllm_ series")
    return found.pop()


def _read_text(samples: list[_Sample], names: _Names, fmt: EngineFormat, default_model: str, what: str) -> Reading:
    by_name: dict[str, list[_Sample]] = defaultdict(list)
    for s in samples:
        by_name[s.name].append(s)
    per_model: dict[str, dict[str, float | None]] = defaultdict(dict)
    wanted = {
        "running": names.running, "waiting": names.waiting,
        "input_tokens": names.input_tokens, "output_tokens": names.output_tokens,
    }
    for key, candidates in wanted.items():
        for model, values in _first_present(by_name, candidates, default_model, what).items():
            per_model[model][key] = _sum_counts(values, f"{fmt}'s {key.replace('_', ' ')}", what)
    for model, values in _first_present(by_name, names.kv_usage, default_model, what).items():
        per_model[model]["kv_cache_usage"] = _mean_fraction(values, f"{fmt}'s KV-cache usage", what)
    ttft = _histograms(samples, names.ttft, default_model, what)
    itl = _histograms(samples, names.itl, default_model, what)
    models = sorted(set(per_model) | set(ttft) | set(itl))
    return Reading(
        fmt,
        tuple(
            ModelReading(
                model,
                running=per_model[model].get("running"),
                waiting=per_model[model].get("waiting"),
                kv_cache_usage=per_model[model].get("kv_cache_usage"),
                input_tokens=per_model[model].get("input_tokens"),
                output_tokens=per_model[model].get("output_tokens"),
                ttft_s=ttft.get(model),
                itl_s=itl.get(model),
            )
            for model in models
        ),
    )


def _model_of(labels: tuple[tuple[str, str], ...], default_model: str) -> str:
    found = dict(labels)
    for key in _MODEL_LABELS:
        if found.get(key):
            return found[key]
    return default_model


def _first_present(
    by_name: Mapping[str, list[_Sample]], candidates: tuple[str, ...], default_model: str, what: str
) -> dict[str, list[float]]:
    """model -> the values of the first candidate series name the page has (one per label set)."""
    for name in candidates:
        rows = by_name.get(name)
        if not rows:
            continue
        seen: set[tuple[tuple[str, str], ...]] = set()
        out: dict[str, list[float]] = defaultdict(list)
        for s in rows:
            if s.labels in seen:
                raise PeerError(f"{what} sent {name}{dict(s.labels)} twice")
            seen.add(s.labels)
            out[_model_of(s.labels, default_model)].append(s.value)
        return out
    return {}


def _sum_counts(values: list[float], name: str, what: str) -> float:
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise PeerError(f"{what} sent {name} = {value!r}, which no count can be")
    return float(sum(values))


def _mean_fraction(values: list[float], name: str, what: str) -> float:
    return _fraction(sum(_fraction(v, name, what) for v in values) / len(values), name, what)


def _histograms(
    samples: list[_Sample], candidates: tuple[str, ...], default_model: str, what: str
) -> dict[str, Histogram]:
    """model -> the first candidate histogram family present, summed over replicas. A model
    whose histogram lacks its +Inf bucket, its sum or its count (a page cut short), or whose
    replicas use different buckets, gets none: it is left out, not guessed at. What cannot be
    a histogram at all (a bound that is no number, a bucket twice, counts that are not
    cumulative, a +Inf bucket unlike the count) makes the page an error."""
    for family in candidates:
        rows = [s for s in samples if s.family == family and s.family_type == "histogram"]
        if not rows:
            continue
        parts: dict[str, dict[tuple[tuple[str, str], ...], _Parts]] = defaultdict(dict)
        for s in rows:
            labels = tuple((k, v) for k, v in s.labels if k != "le")
            part = parts[_model_of(labels, default_model)].setdefault(labels, _Parts())
            if s.name == f"{family}_bucket":
                bound = _bound(dict(s.labels).get("le"), family, what)
                if bound in part.buckets:
                    raise PeerError(f"{what} sent the {family} bucket le={bound:g} twice")
                if len(part.buckets) >= MAX_BUCKETS:
                    raise PeerError(f"{what} sent {family} with more than {MAX_BUCKETS} buckets")
                part.buckets[bound] = s.value
            elif s.name in (f"{family}_sum", f"{family}_count"):
                key = "sum" if s.name.endswith("_sum") else "count"
                if getattr(part, key) is not None:
                    raise PeerError(f"{what} sent {s.name}{dict(labels)} twice")
                setattr(part, key, s.value)
        merged: dict[str, Histogram] = {}
        for model, replicas in parts.items():
            whole = [_histogram(p, family, what) for p in replicas.values()]
            if any(h is None for h in whole) or len({h.bounds for h in whole if h is not None}) != 1:
                continue
            first, *rest = [h for h in whole if h is not None]
            merged[model] = Histogram(
                first.bounds,
                tuple(map(sum, zip(first.counts, *(h.counts for h in rest), strict=True))),
                first.sum + sum(h.sum for h in rest),
                first.count + sum(h.count for h in rest),
            )
        return merged
    return {}


@dataclass
class _Parts:
    buckets: dict[float, float] = field(default_factory=dict)
    sum: float | None = None
    count: float | None = None


def _bound(text: str | None, family: str, what: str) -> float:
    """A bucket's ``le`` as a number: finite, or +Inf for the last bucket."""
    if text is None:
        raise PeerError(f"{what} sent a {family} bucket without 'le'")
    try:
        bound = float(text)
    except ValueError:
        raise PeerError(f"{what} sent a {family} bucket with le={text[:40]!r}, which is no number") from None
    if math.isnan(bound) or bound == -math.inf:
        raise PeerError(f"{what} sent a {family} bucket with le={text[:40]!r}, which is no upper bound")
    return bound


def _histogram(part: _Parts, family: str, what: str) -> Histogram | None:
    if math.inf not in part.buckets or part.count is None or part.sum is None:
        return None
    bounds = tuple(sorted(part.buckets))
    counts = tuple(part.buckets[b] for b in bounds)
    if any(not math.isfinite(c) or c < 0 for c in counts) or any(b < a for a, b in itertools.pairwise(counts)):
        raise PeerError(f"{what} sent {family} buckets that are not cumulative counts")
    if counts[-1] != part.count:
        raise PeerError(f"{what} sent {family} with a +Inf bucket ({counts[-1]:g}) unlike its count ({part.count:g})")
    # These are latencies: their sum is a number of seconds, never negative.
    if not math.isfinite(part.sum) or part.sum < 0:
        raise PeerError(f"{what} sent {family}_sum = {part.sum!r}, which no sum of latencies can be")
    return Histogram(bounds, counts, part.sum, part.count)


__all__ = [
    "FORMATS",
    "MAX_BUCKETS",
    "UNKNOWN_MODEL",
    "EngineFormat",
    "Histogram",
    "ModelReading",
    "Reading",
    "detect",
    "read_iteration_records",
    "read_page",
]
