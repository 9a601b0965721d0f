"""Fixtures for the telemetry tests: a clean environment, real receivers, agents that shut down."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rackscope.agent.settings import AgentSettings
from rackscope.agent.telemetry import Telemetry
from tests.agent.telemetry.expected import IDENTITY
from tests.agent.telemetry.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTLP exporters read OTEL_* variables themselves: start every test without them."""
    for name in list(os.environ):
        if name.startswith(("OTEL_", "RACKSCOPE_")):
            monkeypatch.delenv(name)


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    receiver = OtlpGrpcReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def make_telemetry() -> Iterator[Callable[..., Telemetry]]:
    """Builds Telemetry objects (node n01, empty env unless given) and shuts them all down."""
    made: list[Telemetry] = []

    def make(env: dict[str, str] | None = None, **settings: Any) -> Telemetry:
        telemetry = Telemetry(IDENTITY, AgentSettings(node="n01", **settings), env=env or {})
        made.append(telemetry)
        return telemetry

    yield make
    for telemetry in made:
        telemetry.shutdown(timeout_s=2.0)
