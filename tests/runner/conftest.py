"""Fixtures the runner's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader


@pytest.fixture
def reader() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    """An SDK MeterProvider with an in-memory reader: collect on demand what a run recorded."""
    r = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[r])
    yield r, provider
    provider.shutdown()
