"""The agent's engine view through its real telemetry: the configured page read for the agent's
life, or, without one, a run's server followed only while the run lasts; what the agent's
/metrics text then carries, with the contract's names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rackscope.agent.engine_metrics.host import EngineMetricsHost
from rackscope.agent.settings import AgentSettings
from rackscope.agent.telemetry import Telemetry
from rackscope.agent.telemetry.series import NodeIdentity
from tests.helpers import wait_for
from tests.rackscope.engine_metrics.pages import VLLM_V0, VLLM_V1_EARLY, page
from tests.rackscope.engine_metrics.server import PageServer

IDENTITY = NodeIdentity(rack="r1", node="n01", source="sim", simulated=True, gpu_model="H100", version="test")
INTERVAL_S = 0.05


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    # interval_s also bounds how long a /metrics rendering is cached.
    t = Telemetry(IDENTITY, AgentSettings(node="n01", interval_s=INTERVAL_S), env={})
    t.start()
    yield t
    t.shutdown(timeout_s=1.0)


@pytest.fixture
def server() -> Iterator[PageServer]:
    s = PageServer(page(VLLM_V0))
    yield s
    s.close()


def engine_samples(telemetry: Telemetry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = telemetry.render().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("rackscope_engine_")}


@pytest.mark.slow
def test_configured_page_is_read_for_the_agents_life(telemetry: Telemetry, server: PageServer) -> None:
    host = EngineMetricsHost(telemetry, url=server.url, interval_s=INTERVAL_S)
    assert host.configured
    host.start()
    try:
        ident = {("rack", "r1"), ("node", "n01")}
        model = ("model", "bigscience/bloom-560m")
        expected = {
            ("rackscope_engine_up", frozenset({*ident, ("format", "vllm")})): 1.0,
            ("rackscope_engine_tokens_total", frozenset({*ident, model, ("gen_ai_token_type", "input")})): 1196.0,
            ("rackscope_engine_tokens_total", frozenset({*ident, model, ("gen_ai_token_type", "output")})): 218152.0,
        }
        wait_for("the page on the agent's /metrics", lambda: engine_samples(telemetry) == expected)
        # A run's own server does not replace the page the operator named.
        with host.follow("http://127.0.0.1:9/v1"):
            assert engine_samples(telemetry) == expected
        server.mode = "silent"
        wait_for("the engine marked down, its numbers gone", lambda: engine_samples(telemetry) == {
            ("rackscope_engine_up", frozenset({*ident, ("format", "vllm")})): 0.0})
    finally:
        host.stop()


def test_a_runs_server_is_followed_only_while_the_run_lasts(telemetry: Telemetry, server: PageServer) -> None:
    server.body = page(VLLM_V1_EARLY)
    host = EngineMetricsHost(telemetry, interval_s=INTERVAL_S)
    host.start()
    try:
        assert engine_samples(telemetry) == {}
        with host.follow(server.url.removesuffix("/metrics") + "/v1", model="qwen"):
            wait_for("the run's server read", lambda: ("rackscope_engine_requests", frozenset({
                ("rack", "r1"), ("node", "n01"), ("model", "Qwen/Qwen2.5-Coder-32B-Instruct"), ("state", "waiting"),
            })) in engine_samples(telemetry))
        wait_for("nothing exported between runs", lambda: engine_samples(telemetry) == {})
    finally:
        host.stop()
