"""An inference server's readings over a run, kept so that any stretch of it can be summed up
afterwards: counters as deltas, gauges as mean and max, histograms as quantiles.

The scraper's thread hands each page understood to ``ReadingHistory.add`` with the moment it
stands for. One model is followed: the one the run names, or the page's only model when that
name is not on it (a server may label its series with a path while answering to a short name).

Counters and histograms are made reset-aware as they arrive, the way Prometheus' ``increase``
is: a counter below its previous reading (a server restarted) counts from zero again, so what
a sample holds is the amount counted since the history began, and the difference of two
samples is what the server counted between them. A histogram whose buckets change (another
server version, other flags) starts a new layout; two samples of different layouts are not
subtracted.

Memory is bounded for runs of any length: past ``MAX_SAMPLES`` samples every other one is
folded into the next (counters are cumulative, so nothing of them is lost; gauges keep their
sum, count and peak), and later readings are folded likewise, so the spacing doubles instead.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rackscope.engine_metrics.formats import EngineFormat, Histogram, ModelReading, Reading

MAX_SAMPLES = 4096  # about an hour at one reading a second before the spacing doubles


@dataclass(frozen=True, slots=True)
class Gauge:
    """Readings of one gauge folded together: their sum, how many, the largest."""

    total: float
    n: int
    peak: float

    @classmethod
    def of(cls, value: float | None) -> Gauge | None:
        return None if value is None else cls(value, 1, value)

    def merge(self, other: Gauge | None) -> Gauge:
        if other is None:
            return self
        return Gauge(self.total + other.total, self.n + other.n, max(self.peak, other.peak))


def _merge(a: Gauge | None, b: Gauge | None) -> Gauge | None:
    return b if a is None else a.merge(b)


@dataclass(frozen=True, slots=True)
class Cumulative:
    """A histogram as counted since the history began (resets undone), in one layout."""

    layout: int
    bounds: tuple[float, ...]  # upper bounds, the last +Inf
    counts: tuple[float, ...]  # cumulative, one per bound
    sum: float
    count: float


@dataclass(frozen=True, slots=True)
class Sample:
    """What the page said at ``t``. None: the page did not say."""

    t: float
    running: Gauge | None = None
    waiting: Gauge | None = None
    kv_cache_usage: Gauge | None = None
    input_tokens: float | None = None  # counted since the history began, resets undone
    output_tokens: float | None = None
    ttft_s: Cumulative | None = None
    itl_s: Cumulative | None = None

    def folded_into(self, later: Sample) -> Sample:
        """``later`` standing for both: its counters, the two samples' gauges together."""
        return replace(
            later,
            running=_merge(self.running, later.running),
            waiting=_merge(self.waiting, later.waiting),
            kv_cache_usage=_merge(self.kv_cache_usage, later.kv_cache_usage),
        )


class _Counter:
    """A server counter made monotonic: a drop is a restart, counted from zero again."""

    __slots__ = ("previous", "resets", "total")

    def __init__(self) -> None:
        self.previous: float | None = None
        self.total = 0.0
        self.resets = 0

    def update(self, raw: float | None) -> float | None:
        if raw is None:
            return None
        if self.previous is not None:
            if raw >= self.previous:
                self.total += raw - self.previous
            else:
                self.total += raw
                self.resets += 1
        self.previous = raw
        return self.total


class _HistogramCounter:
    """A server histogram made monotonic bucket by bucket, the way ``_Counter`` does a counter."""

    __slots__ = ("count", "counts", "layout", "previous", "resets", "sum")

    def __init__(self) -> None:
        self.previous: Histogram | None = None
        self.layout = 0
        self.counts: tuple[float, ...] = ()
        self.sum = 0.0
        self.count = 0.0
        self.resets = 0

    def update(self, raw: Histogram | None) -> Cumulative | None:
        if raw is None:
            return None
        prev = self.previous
        if prev is None or prev.bounds != raw.bounds:
            # Counting starts here, in a layout of its own.
            self.resets += prev is not None
            self.layout += 1
            self.counts = (0.0,) * len(raw.bounds)
            self.sum = self.count = 0.0
        elif raw.count < prev.count or raw.sum < prev.sum or any(
            c < p for c, p in zip(raw.counts, prev.counts, strict=True)
        ):
            self.resets += 1
            self.counts = tuple(t + c for t, c in zip(self.counts, raw.counts, strict=True))
            self.sum += raw.sum
            self.count += raw.count
        else:
            self.counts = tuple(t + c - p for t, c, p in zip(self.counts, raw.counts, prev.counts, strict=True))
            self.sum += raw.sum - prev.sum
            self.count += raw.count - prev.count
        self.previous = raw
        return Cumulative(self.layout, raw.bounds, self.counts, self.sum, self.count)


class ReadingHistory:
    """Readings of one model over time; ``add`` from any thread, ``samples`` afterwards."""

    def __init__(self, model: str | None = None, max_samples: int = MAX_SAMPLES) -> None:
        if max_samples < 4:
            raise ValueError("a history keeps at least 4 samples")
        self.model = model
        self.max_samples = max_samples
        self.format: EngineFormat | None = None
        self.model_seen: str | None = None  # the model whose series are followed, once found
        self.models_on_page: tuple[str, ...] = ()  # of the last page, when the model is not on it
        self.readings = 0  # pages understood
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._tail: Sample | None = None  # the latest reading, not yet kept (spacing > 1)
        self._tail_n = 0
        self._stride = 1  # readings folded into each kept sample
        self._input = _Counter()
        self._output = _Counter()
        self._ttft = _HistogramCounter()
        self._itl = _HistogramCounter()

    @property
    def resets(self) -> int:
        """Counter resets seen (a server restarted, or changed its histogram buckets)."""
        return max(self._input.resets, self._output.resets, self._ttft.resets, self._itl.resets)

    def _followed(self, reading: Reading) -> ModelReading | None:
        by_name = {m.model: m for m in reading.models}
        if self.model in by_name:
            return by_name[self.model]
        if len(by_name) == 1:
            return next(iter(by_name.values()))
        if by_name:
            self.models_on_page = tuple(sorted(by_name))
        return None

    def add(self, t: float, reading: Reading) -> None:
        """One page understood, standing for moment ``t``; a reading older than the latest is
        dropped (it can only come from a read that overlapped another)."""
        with self._lock:
            latest = self._tail or (self._samples[-1] if self._samples else None)
            if latest is not None and t <= latest.t:
                return
            self.readings += 1
            self.format = self.format or reading.format
            m = self._followed(reading)
            if m is not None:
                self.model_seen = m.model
            sample = Sample(
                t,
                running=Gauge.of(m.running if m else None),
                waiting=Gauge.of(m.waiting if m else None),
                kv_cache_usage=Gauge.of(m.kv_cache_usage if m else None),
                input_tokens=self._input.update(m.input_tokens if m else None),
                output_tokens=self._output.update(m.output_tokens if m else None),
                ttft_s=self._ttft.update(m.ttft_s if m else None),
                itl_s=self._itl.update(m.itl_s if m else None),
            )
            if self._tail is not None:
                sample = self._tail.folded_into(sample)
            self._tail, self._tail_n = sample, self._tail_n + 1
            if self._tail_n >= self._stride:
                self._samples.append(sample)
                self._tail, self._tail_n = None, 0
                if len(self._samples) >= self.max_samples:
                    self._thin()

    def _thin(self) -> None:
        """Fold every other sample into the next (the first, a run's baseline, stays as it is)."""
        first, rest = self._samples[0], self._samples[1:]
        kept = [first]
        kept += [rest[i].folded_into(rest[i + 1]) for i in range(0, len(rest) - 1, 2)]
        if len(rest) % 2:
            kept.append(rest[-1])
        self._samples = kept
        self._stride *= 2

    def samples(self) -> list[Sample]:
        """Every sample kept, oldest first, the latest reading last."""
        with self._lock:
            return [*self._samples, *([self._tail] if self._tail is not None else [])]


# --- what a stretch of the history adds up to --------------------------------------------------
def counter_delta(a: float | None, b: float | None) -> float | None:
    """What a counter counted between two samples (None unless both have it)."""
    return None if a is None or b is None else b - a


@dataclass(frozen=True, slots=True)
class Counts:
    """A histogram's counts over a stretch: cumulative per bound, and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def plus(self, other: Counts) -> Counts | None:
        """Two stretches together; None when their buckets differ."""
        if other.bounds != self.bounds:
            return None
        return Counts(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
                      self.sum + other.sum)


def histogram_delta(a: Cumulative | None, b: Cumulative | None) -> Counts | None:
    """What a histogram counted between two samples (None unless both have it, in one layout)."""
    if a is None or b is None or a.layout != b.layout:
        return None
    return Counts(b.bounds, tuple(y - x for x, y in zip(a.counts, b.counts, strict=True)), b.sum - a.sum)


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The ``q`` quantile (0-1) of cumulative bucket counts, as Prometheus' ``histogram_quantile``
    computes it: linear within the bucket the rank falls in, from 0 for the first bucket (when
    its bound is positive); a rank in the +Inf bucket gives the largest finite bound. None
    without observations."""
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile is between 0 and 1, not {q}")
    if not counts or counts[-1] <= 0 or len(bounds) != len(counts):
        return None
    rank = q * counts[-1]
    i = bisect.bisect_left(counts, rank)
    i = min(i, len(counts) - 1)
    if math.isinf(bounds[i]):
        finite = [b for b in bounds if math.isfinite(b)]
        return finite[-1] if finite else None
    lower = bounds[i - 1] if i > 0 else min(0.0, bounds[0])
    below = counts[i - 1] if i > 0 else 0.0
    inside = counts[i] - below
    if inside <= 0:
        return bounds[i]
    return lower + (bounds[i] - lower) * (rank - below) / inside


def gauge_stats(gauges: Sequence[Gauge | None]) -> tuple[float, float] | None:
    """Mean and largest of the readings folded in ``gauges`` (None when none has any)."""
    present = [g for g in gauges if g is not None and g.n > 0]
    if not present:
        return None
    n = sum(g.n for g in present)
    return math.fsum(g.total for g in present) / n, max(g.peak for g in present)


__all__ = [
    "MAX_SAMPLES",
    "Counts",
    "Cumulative",
    "Gauge",
    "ReadingHistory",
    "Sample",
    "counter_delta",
    "gauge_stats",
    "histogram_delta",
    "histogram_quantile",
]
