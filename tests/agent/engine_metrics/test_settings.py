"""The agent's engine-metrics settings: flag over environment over default, and the mistakes
refused before anything starts."""

from __future__ import annotations

import pytest

from rackscope.agent.settings import AgentSettings, resolve
from rackscope.errors import ConfigError

URL = "http://127.0.0.1:8000/metrics"


@pytest.mark.parametrize(
    ("args", "env", "url", "fmt"),
    [
        ({}, {}, None, None),
        ({}, {"RACKSCOPE_ENGINE_METRICS": URL}, URL, None),
        ({"engine_metrics_url": "http://10.0.0.9:30000/metrics"}, {"RACKSCOPE_ENGINE_METRICS": URL},
         "http://10.0.0.9:30000/metrics", None),
        ({"engine_metrics_url": URL, "engine_metrics_format": "sglang"},
         {"RACKSCOPE_ENGINE_METRICS_FORMAT": "vllm"}, URL, "sglang"),
        ({}, {"RACKSCOPE_ENGINE_METRICS": URL, "RACKSCOPE_ENGINE_METRICS_FORMAT": "trtllm"}, URL, "trtllm"),
    ],
)
def test_resolution_order(args: dict[str, str], env: dict[str, str], url: str | None, fmt: str | None) -> None:
    settings = resolve(args, env, AgentSettings(node="n01"))
    assert (settings.engine_metrics_url, settings.engine_metrics_format) == (url, fmt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"engine_metrics_format": "vllm"}, "needs --engine-metrics URL"),
        ({"engine_metrics_url": URL, "engine_metrics_format": "tgi"}, "must be one of vllm, sglang, trtllm"),
        ({"engine_metrics_url": "ftp://127.0.0.1/metrics"}, "http:// or https:// URL"),
        ({"engine_metrics_url": "127.0.0.1:8000"}, "http:// or https:// URL"),
    ],
)
def test_mistakes_are_refused(args: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(args, {}, AgentSettings(node="n01"))
