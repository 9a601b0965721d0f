"""A run's readings of its server over time: counter and histogram deltas that undo restarts,
gauges folded into mean and peak, quantiles as Prometheus computes them, and memory bounded for a
run of any length without losing a counted token."""

from __future__ import annotations

import math

import pytest

from rackscope.engine_metrics.formats import EngineFormat, Histogram, ModelReading, Reading
from rackscope.engine_metrics.history import (
    ReadingHistory,
    counter_delta,
    gauge_stats,
    histogram_delta,
    histogram_quantile,
)

BOUNDS = (0.1, 0.5, 1.0, math.inf)


def reading(*models: ModelReading) -> Reading:
    return Reading(EngineFormat.VLLM, models)


def hist(counts: tuple[float, ...], total: float, bounds: tuple[float, ...] = BOUNDS) -> Histogram:
    return Histogram(bounds, counts, total, counts[-1])


def test_counters_are_deltas_and_a_restart_counts_from_zero() -> None:
    h = ReadingHistory("m")
    for t, out in ((1.0, 1000.0), (2.0, 1500.0), (3.0, 200.0), (4.0, 700.0)):  # restarted between 2 and 3
        h.add(t, reading(ModelReading("m", output_tokens=out, input_tokens=out / 10)))
    s = h.samples()
    assert [x.output_tokens for x in s] == [0.0, 500.0, 700.0, 1200.0]
    assert counter_delta(s[1].output_tokens, s[3].output_tokens) == 700.0
    assert counter_delta(s[0].input_tokens, s[3].input_tokens) == pytest.approx(120.0)
    assert h.resets == 1
    assert (h.format, h.model_seen, h.readings) == (EngineFormat.VLLM, "m", 4)


def test_a_counter_missing_from_a_page_is_no_delta_not_zero() -> None:
    h = ReadingHistory("m")
    h.add(1.0, reading(ModelReading("m", output_tokens=10.0)))
    h.add(2.0, reading(ModelReading("m", running=1.0)))
    h.add(3.0, reading(ModelReading("m", output_tokens=30.0)))
    a, b, c = h.samples()
    assert counter_delta(a.output_tokens, b.output_tokens) is None
    assert counter_delta(a.output_tokens, c.output_tokens) == 20.0  # the gap does not break the count


def test_histogram_deltas_undo_restarts_and_never_subtract_unlike_buckets() -> None:
    h = ReadingHistory("m")
    h.add(1.0, reading(ModelReading("m", ttft_s=hist((1, 3, 4, 4), 2.0))))
    h.add(2.0, reading(ModelReading("m", ttft_s=hist((2, 6, 8, 9), 5.0))))
    h.add(3.0, reading(ModelReading("m", ttft_s=hist((1, 1, 2, 2), 1.0))))  # restarted
    h.add(4.0, reading(ModelReading("m", ttft_s=hist((1, 1, 1, 1), 0.5, (0.2, 0.4, 0.8, math.inf)))))
    a, b, c, d = h.samples()
    ab = histogram_delta(a.ttft_s, b.ttft_s)
    assert ab is not None and (ab.counts, ab.sum, ab.count) == ((1, 3, 4, 5), 3.0, 5)
    ac = histogram_delta(a.ttft_s, c.ttft_s)
    assert ac is not None and (ac.counts, ac.sum) == ((2, 4, 6, 7), 4.0)
    assert histogram_delta(c.ttft_s, d.ttft_s) is None  # other buckets: another layout
    assert histogram_delta(b.itl_s, c.itl_s) is None
    assert h.resets == 2


def test_quantiles_interpolate_as_prometheus_does() -> None:
    bounds, counts = (0.1, 0.5, 1.0, math.inf), (10.0, 30.0, 40.0, 40.0)
    # rank 20 lies half-way into the (0.1, 0.5] bucket; rank 4 at 40 % of the first, from 0.
    assert histogram_quantile(0.5, bounds, counts) == pytest.approx(0.3)
    assert histogram_quantile(0.1, bounds, counts) == pytest.approx(0.04)
    assert histogram_quantile(1.0, bounds, counts) == pytest.approx(1.0)
    # A rank in the +Inf bucket: the largest finite bound, as Prometheus answers.
    assert histogram_quantile(0.99, bounds, (10.0, 30.0, 40.0, 100.0)) == 1.0
    assert histogram_quantile(0.5, bounds, (0.0, 0.0, 0.0, 0.0)) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile(1.5, bounds, counts)


def test_gauges_fold_into_mean_and_peak() -> None:
    h = ReadingHistory("m")
    for t, running in enumerate((2.0, 6.0, 4.0)):
        h.add(float(t), reading(ModelReading("m", running=running, kv_cache_usage=running / 10)))
    s = h.samples()
    assert gauge_stats([x.running for x in s]) == (4.0, 6.0)
    assert gauge_stats([x.waiting for x in s]) is None


def test_memory_is_bounded_without_losing_a_count_or_a_peak() -> None:
    h = ReadingHistory("m", max_samples=8)
    n = 1000
    for i in range(n):
        running = 99.0 if i == 517 else 1.0
        h.add(float(i), reading(ModelReading("m", output_tokens=float(3 * i), running=running)))
    s = h.samples()
    assert len(s) <= 9  # the kept samples, and the latest reading
    assert s[0].t == 0.0 and s[-1].t == n - 1  # the baseline and the latest stay exact
    assert s[-1].output_tokens == 3 * (n - 1)  # counters are cumulative: nothing is lost
    assert all(x.output_tokens == 3 * x.t for x in s)
    mean, peak = gauge_stats([x.running for x in s]) or (0.0, 0.0)
    assert peak == 99.0  # folded samples keep their peak ...
    assert sum(x.running.n for x in s if x.running) == n  # ... and every reading's share of the mean
    assert mean == pytest.approx((n - 1 + 99.0) / n)
    assert h.readings == n


def test_the_run_model_is_followed_or_the_page_only_model() -> None:
    h = ReadingHistory("llama2-70b")
    h.add(1.0, reading(ModelReading("/models/Llama-2-70b", running=3.0)))  # named by its path
    assert h.samples()[-1].running is not None and h.model_seen == "/models/Llama-2-70b"
    h.add(2.0, reading(ModelReading("a", running=1.0), ModelReading("llama2-70b", running=5.0)))
    assert h.samples()[-1].running.peak == 5.0  # type: ignore[union-attr]
    other = ReadingHistory("llama2-70b")
    other.add(1.0, reading(ModelReading("a", running=1.0), ModelReading("b", running=2.0)))
    assert other.samples()[-1].running is None  # which one? neither
    assert (other.model_seen, other.models_on_page) == (None, ("a", "b"))


def test_a_reading_older_than_the_latest_is_dropped() -> None:
    h = ReadingHistory("m")
    h.add(2.0, reading(ModelReading("m", output_tokens=20.0)))
    h.add(1.5, reading(ModelReading("m", output_tokens=10.0)))
    h.add(3.0, reading(ModelReading("m", output_tokens=30.0)))
    assert [(x.t, x.output_tokens) for x in h.samples()] == [(2.0, 0.0), (3.0, 10.0)]
    assert h.resets == 0
