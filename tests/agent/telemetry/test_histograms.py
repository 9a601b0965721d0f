"""Histograms aggregated outside the SDK (``rackscope.histograms``) export exactly what the SDK
exports for the same observations, on both of the agent's paths: the same observations go into
one agent through SDK instruments and into another through the pre-aggregated registry, and
the two agents' /metrics text and OTLP protobuf (decoded by a real receiver) are compared value
by value. Plus the cell's own rules: bucket edges, copied histograms, misuse."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from rackscope import contract
from rackscope.agent.telemetry import Telemetry
from rackscope.histograms import HistogramRegistry
from tests.agent.telemetry.otlp_receiver import OtlpHttpReceiver, Point

HISTOGRAMS = (
    (contract.OPERATION_DURATION, contract.OPERATION_DURATION_BUCKETS_S),
    (contract.TIME_TO_FIRST_CHUNK, contract.TIME_TO_FIRST_CHUNK_BUCKETS_S),
    (contract.TIME_PER_OUTPUT_TOKEN, contract.TPOT_BUCKETS_S),
)
ATTRS = [
    {"rack": "r1", "node": "n01", "gpu": str(gpu), "model": "llama2-70b", "engine": "sim",
     "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "rackscope.sim",
     "gen_ai.request.model": "llama2-70b"}
    for gpu in ("0", "1", "all")
]
Observation = tuple[int, int, float]  # (histogram, attribute set, value)


def observations(rng: random.Random, n: int, dyadic: bool) -> list[Observation]:
    """Values across every bucket, the exact boundaries included (they belong to the bucket they
    close), below the first bound and above the last. ``dyadic``: multiples of 1/1024, whose
    sums are exact in binary whatever the order of the additions."""
    out = []
    for _ in range(n):
        h = rng.randrange(len(HISTOGRAMS))
        bounds = HISTOGRAMS[h][1]
        pick = rng.random()
        if pick < 0.25:
            value = rng.choice(bounds)
        elif pick < 0.3:
            value = bounds[0] / 2
        elif pick < 0.35:
            value = bounds[-1] * 3
        else:
            value = rng.uniform(0.0, bounds[-1] * 1.2)
        if dyadic:
            value = round(value * 1024) / 1024
        out.append((h, rng.randrange(len(ATTRS)), value))
    return out


class Sdk:
    """Records through SDK histogram instruments on the agent's meter (its views set the bounds)."""

    def __init__(self, telemetry: Telemetry) -> None:
        meter = telemetry.meter
        self.instruments = [meter.create_histogram(m.otel_name, m.unit, m.description) for m, _ in HISTOGRAMS]

    def observe(self, h: int, a: int, value: float) -> None:
        self.instruments[h].record(value, ATTRS[a])


class PreAggregated:
    """Records into the agent's registry, one cell per attribute set, as the runner does."""

    def __init__(self, telemetry: Telemetry) -> None:
        registry = telemetry.histograms
        families = [registry.family(m.otel_name, m.unit, m.description, bounds) for m, bounds in HISTOGRAMS]
        self.cells = [[f.cell(attrs) for attrs in ATTRS] for f in families]

    def observe(self, h: int, a: int, value: float) -> None:
        self.cells[h][a].observe(value)


def histogram_series(body: bytes) -> dict[tuple[str, str], list[str]]:
    """(family, labels without le) -> that series' lines, in order: the HELP and TYPE lines, then
    every bucket, sum and count line, byte for byte. Families and series are keyed, not listed,
    because their order in the text carries nothing (the SDK's follows first use)."""
    names = tuple(m.prom_name for m, _ in HISTOGRAMS)
    out: dict[tuple[str, str], list[str]] = {}
    for line in body.decode().splitlines():
        if line.startswith("# "):
            name = line.split()[2]
            if name in names:
                out.setdefault((name, ""), []).append(line)
            continue
        if not line.startswith(names):
            continue
        series, labels = line.split("{", 1)
        family = series.rsplit("_", 1)[0]
        plain = ",".join(part for part in labels.split("} ")[0].split(",") if not part.startswith("le="))
        out.setdefault((family, plain), []).append(line)
    return out


def exported(receiver: OtlpHttpReceiver) -> dict[tuple[str, frozenset[tuple[str, object]]], Point]:
    names = {m.otel_name for m, _ in HISTOGRAMS}
    return {key: p for key, p in receiver.latest().items() if key[0] in names}


def comparable(p: Point) -> tuple[object, ...]:
    """Everything a point carries but its timestamps."""
    return (p.name, p.unit, p.kind, p.temporality, p.attributes, p.count, p.sum, p.bounds, p.bucket_counts,
            p.min, p.max, p.scope, p.resource)


def agents(
    make_telemetry: Callable[..., Telemetry], sdk_receiver: OtlpHttpReceiver, pre_receiver: OtlpHttpReceiver
) -> tuple[Telemetry, Sdk, Telemetry, PreAggregated]:
    sdk_agent = make_telemetry(otlp_endpoint=sdk_receiver.url, otlp_interval_s=3600.0)
    pre_agent = make_telemetry(otlp_endpoint=pre_receiver.url, otlp_interval_s=3600.0)
    return sdk_agent, Sdk(sdk_agent), pre_agent, PreAggregated(pre_agent)


@pytest.mark.parametrize(("dyadic", "collections"), [(False, 1), (True, 6)], ids=["one-collection", "six"])
def test_both_paths_export_what_the_sdk_exports(make_telemetry: Callable[..., Telemetry], dyadic: bool,
                                                collections: int) -> None:
    sdk_receiver, pre_receiver = OtlpHttpReceiver(), OtlpHttpReceiver()
    try:
        sdk_agent, sdk, pre_agent, pre = agents(make_telemetry, sdk_receiver, pre_receiver)
        obs = observations(random.Random(20251), 3000, dyadic)
        batch = len(obs) // collections
        renders = 0
        for start in range(0, len(obs), batch):
            for h, a, value in obs[start:start + batch]:
                sdk.observe(h, a, value)
                pre.observe(h, a, value)
            # Prometheus text: the same lines, byte for byte, at every scrape.
            sdk_text, pre_text = histogram_series(sdk_agent.render()), histogram_series(pre_agent.render())
            assert pre_text == sdk_text
            renders += 1
            for agent in (sdk_agent, pre_agent):
                agent.update([], [], None)  # a new tick: the next render collects afresh
        assert renders == collections
        assert len(sdk_text) == len(HISTOGRAMS) * (1 + len(ATTRS))  # every family and series there
        assert sum(map(len, sdk_text.values())) == 2 * 3 + len(ATTRS) * sum(len(b) + 3 for _, b in HISTOGRAMS)
        # OTLP: the final export of each, decoded from the official protobufs.
        assert sdk_agent.shutdown(timeout_s=5.0) and pre_agent.shutdown(timeout_s=5.0)
        sdk_points, pre_points = exported(sdk_receiver), exported(pre_receiver)
        assert len(sdk_points) == len(HISTOGRAMS) * len(ATTRS)
        assert set(pre_points) == set(sdk_points)
        for key, sdk_point in sdk_points.items():
            assert comparable(pre_points[key]) == comparable(sdk_point), key
            assert pre_points[key].start_time_unix_nano > 0
        # And what was exported is what was observed.
        for h, (metric, bounds) in enumerate(HISTOGRAMS):
            for a, attrs in enumerate(ATTRS):
                values = [v for hh, aa, v in obs if (hh, aa) == (h, a)]
                point = pre_points[(metric.otel_name, frozenset(attrs.items()))]
                assert point.count == len(values)
                assert point.bucket_counts == [
                    sum(1 for v in values if (i == 0 or v > bounds[i - 1]) and (i == len(bounds) or v <= bounds[i]))
                    for i in range(len(bounds) + 1)
                ]
                assert (point.min, point.max) == (min(values), max(values))
    finally:
        sdk_receiver.close()
        pre_receiver.close()


def test_a_copied_histogram_is_exported_as_given(make_telemetry: Callable[..., Telemetry],
                                                 http_receiver: OtlpHttpReceiver) -> None:
    """``set``: an inference server's own histogram, re-exported with its boundaries and counts."""
    agent = make_telemetry(otlp_endpoint=http_receiver.url, otlp_interval_s=3600.0)
    family = agent.histograms.family("rackscope.engine.time_to_first_token", "s", "The server's TTFT", (1.0,))
    cell = family.cell({"rack": "r1", "node": "n01", "model": "m"})
    cell.set((0.1, 0.5, 2.5), (3, 0, 6, 1), 7.25, 10)
    cell.set((0.1, 0.5, 2.5), (4, 1, 6, 1), 8.5, 12)  # the next scrape: replaces, never adds
    text = agent.render().decode()
    assert 'rackscope_engine_time_to_first_token_seconds_bucket{rack="r1",node="n01",model="m",le="0.5"} 5' in text
    assert 'rackscope_engine_time_to_first_token_seconds_bucket{rack="r1",node="n01",model="m",le="+Inf"} 12' in text
    assert 'rackscope_engine_time_to_first_token_seconds_sum{rack="r1",node="n01",model="m"} 8.5' in text
    assert agent.shutdown(timeout_s=5.0)
    (point,) = [p for key, p in http_receiver.latest().items() if key[0] == "rackscope.engine.time_to_first_token"]
    assert (point.bounds, point.bucket_counts, point.sum, point.count) == ([0.1, 0.5, 2.5], [4, 1, 6, 1], 8.5, 12)
    assert (point.min, point.max) == (None, None)  # a page has none: left unset, not zero
    assert point.temporality == "cumulative"
    assert point.scope == "rackscope.workload"


def test_cells_bucket_at_the_upper_edge_and_track_min_max() -> None:
    registry = HistogramRegistry("test")
    cell = registry.family("h", "s", "d", (1.0, 2.0)).cell({"a": "b"})
    for value in (1.0, 1.0000001, 2.0, 0.0, -1.0, 2.5):
        cell.observe(value)
    (metric,) = registry.metrics(123)
    (point,) = metric.data.data_points
    assert tuple(point.bucket_counts) == (3, 2, 1)  # (-inf, 1], (1, 2], (2, +inf)
    assert (point.count, point.min, point.max, point.time_unix_nano) == (6, -1.0, 2.5, 123)
    assert point.sum == 1.0 + 1.0000001 + 2.0 + 0.0 - 1.0 + 2.5


def test_no_data_no_series_and_cells_are_shared() -> None:
    registry = HistogramRegistry("test")
    family = registry.family("h", "s", "d", (1.0,))
    assert family.cell({"a": "1", "b": "2"}) is family.cell({"b": "2", "a": "1"})
    assert registry.metrics() == []  # a cell made but never observed exports nothing
    assert registry.family("h", "s", "d", [1.0]) is family


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.family("h", "s", "d", (2.0, 1.0)), "increase strictly"),
        (lambda r: r.family("h", "s", "d", (1.0, math.inf)), "finite"),
        (lambda r: (r.family("h", "s", "d", (1.0,)), r.family("h", "s", "d", (1.0, 2.0))), "already exists"),
        (lambda r: r.family("h", "s", "d", (1.0,)).cell({}).set((1.0,), (1, 1, 1), 1.0, 3), "bucket counts"),
        (lambda r: r.family("h", "s", "d", (1.0,)).cell({}).set((1.0,), (1, 1), 1.0, 3), "add up"),
        (lambda r: r.family("h", "s", "d", (1.0,)).cell({}).set((1.0,), (-1, 2), 1.0, 1), "non-negative"),
    ],
)
def test_misuse_is_refused(call: Callable[[HistogramRegistry], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(HistogramRegistry("test"))


def test_a_cell_is_observed_or_copied_not_both() -> None:
    family = HistogramRegistry("test").family("h", "s", "d", (1.0,))
    observed, copied = family.cell({"k": "observed"}), family.cell({"k": "copied"})
    observed.observe(0.5)
    with pytest.raises(ValueError, match="observed"):
        observed.set((1.0,), (1, 0), 0.5, 1)
    copied.set((1.0,), (1, 0), 0.5, 1)
    with pytest.raises(ValueError, match="copied"):
        copied.observe(0.5)


def test_the_runner_records_into_the_agents_registry(make_telemetry: Callable[..., Telemetry]) -> None:
    from rackscope.runner.records import RequestRecord
    from rackscope.runner.telemetry import WorkloadTelemetry

    agent = make_telemetry()
    workload = WorkloadTelemetry(agent.meter, rack="r1", node="n01", model="m", engine="openai", api="chat")
    workload.record(RequestRecord("a", 10.0, 10.25, 12.25, 7, 9, "usage", True, gpu=None))
    families = {m.name: m for m in agent.histograms.metrics()}
    assert set(families) == {m.otel_name for m, _ in HISTOGRAMS}
    (point,) = families[contract.TIME_PER_OUTPUT_TOKEN.otel_name].data.data_points
    assert (point.count, point.sum) == (1, 0.25)  # (12.25 - 10.25) / (9 - 1)
    text = agent.render().decode()
    labels = ('{rack="r1",node="n01",gpu="all",model="m",engine="openai",gen_ai_operation_name="chat",'
              'gen_ai_provider_name="openai_compatible",gen_ai_request_model="m"}')
    assert f"gen_ai_client_operation_time_to_first_chunk_seconds_count{labels} 1\n" in text
    assert f"gen_ai_client_operation_duration_seconds_sum{labels} 2.25\n" in text
    assert text.count("# TYPE rackscope_time_per_output_token_seconds histogram") == 1
