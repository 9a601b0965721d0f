"""The control API over real HTTP: node view, faults, tokens, runs, bad input, and a fuzz."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.conftest import LiveAgent, start_agent


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    text = httpx.get(metrics_url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("gpu", "")] = sample.value
    return out


def wait_for(predicate, timeout_s: float = 10.0, step_s: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError("condition not met in time")


def test_health_and_node_view(live_agent: LiveAgent) -> None:
    assert httpx.get(live_agent.api + "/healthz").json()["status"] == "ok"
    node = httpx.get(live_agent.api + "/v1/node").json()
    assert (node["rack"], node["node"], node["source"], node["simulated"]) == ("r1", "n01", "sim", True)
    assert node["gpus"] == 2 or len(node["gpus"]) == 2
    gpus = node["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["model"] == "NVIDIA H100 80GB HBM3"
    assert gpus[0]["sample"]["power_w"] == pytest.approx(70.0)
    assert node["metrics_port"] == int(live_agent.metrics.rsplit(":", 1)[1])


def test_power_cap_fault_shows_in_metrics_and_clears(live_agent: LiveAgent) -> None:
    live_agent.agent.sim_gpus[0].set_load(1.0)  # type: ignore[index]
    wait_for(lambda: metric_values(live_agent.metrics, "hw_power_watts").get("0", 0) > 600)
    r = httpx.post(live_agent.api + "/v1/faults", json={"fault": "power-cap", "gpu": 0, "value": 300})
    assert r.status_code == 200, r.text
    assert r.json()["gpus"][0]["power_cap_w"] == 300
    power = wait_for(lambda: (v := metric_values(live_agent.metrics, "hw_power_watts")) and v["0"] <= 300 and v)
    assert power["0"] == pytest.approx(300.0)
    throttle = {
        (s.labels["gpu"], s.labels["reason"]): s.value
        for f in text_string_to_metric_families(httpx.get(live_agent.metrics + "/metrics").text)
        for s in f.samples
        if s.name == "rackscope_gpu_throttle"
    }
    assert throttle[("0", "sw_power_cap")] == 1 and throttle[("1", "sw_power_cap")] == 0
    assert httpx.delete(live_agent.api + "/v1/faults").json()["active"] == []
    wait_for(lambda: metric_values(live_agent.metrics, "hw_power_watts").get("0", 0) > 600)


def test_gpu_drop_marks_the_gpu_down_and_keeps_the_other(live_agent: LiveAgent) -> None:
    assert httpx.post(live_agent.api + "/v1/faults", json={"fault": "gpu-drop", "gpu": 1}).status_code == 200
    up = wait_for(lambda: (v := metric_values(live_agent.metrics, "rackscope_gpu_up")) and v.get("1") == 0 and v)
    assert up["0"] == 1
    errors = {
        s.labels["error_type"]: s.value
        for f in text_string_to_metric_families(httpx.get(live_agent.metrics + "/metrics").text)
        for s in f.samples
        if s.name == "hw_errors_total" and s.labels.get("gpu") == "0"
    }
    assert errors.get("xid", 0) == 0


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"fault": "meltdown"}, 422, "fault"),
        ({"fault": "power-cap", "gpu": 7}, 400, "GPU 7 does not exist"),
        ({"fault": "power-cap", "value": -1}, 422, "value"),
        ({"fault": "engine-slow", "gpu": 0}, 400, "whole node"),
        ({"fault": "power-cap", "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_fault_requests_get_4xx_with_a_reason(live_agent: LiveAgent, body: dict, status: int, reason: str) -> None:
    r = httpx.post(live_agent.api + "/v1/faults", json=body)
    assert r.status_code == status
    assert reason in r.text


def test_token_is_required_on_mutating_calls_only(token_agent: LiveAgent) -> None:
    url = token_agent.api + "/v1/faults"
    assert httpx.post(url, json={"fault": "thermal-throttle"}).status_code == 401
    assert (
        httpx.post(url, json={"fault": "thermal-throttle"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    ok = httpx.post(url, json={"fault": "thermal-throttle"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(token_agent.api + "/v1/node").status_code == 200
    assert httpx.post(token_agent.api + "/v1/runs", json={"duration_s": 1}).status_code == 401


def test_runs_one_at_a_time_with_record_and_requests(live_agent: LiveAgent) -> None:
    r = httpx.post(
        live_agent.api + "/v1/runs",
        json={
            "engine": "sim",
            "scenario": "concurrency",
            "concurrency": 4,
            "output_len": 16,
            "duration_s": 2.0,
            "run_id": "first",
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["run_id"] == "first"
    busy = httpx.post(live_agent.api + "/v1/runs", json={"engine": "sim", "duration_s": 1.0})
    assert busy.status_code == 409 and "one run per agent" in busy.text
    assert httpx.get(live_agent.api + "/v1/runs/first/record").status_code == 409
    done = wait_for(
        lambda: (v := httpx.get(live_agent.api + "/v1/runs/first").json())["status"] == "completed" and v, timeout_s=30
    )
    summary = done["summary"]
    assert summary["output_tokens"] > 0 and summary["complete"] is True
    record = httpx.get(live_agent.api + "/v1/runs/first/record").json()
    assert record["schema"] == "rackscope.run/1" and record["run_id"] == "first"
    assert record["summary"]["output_tokens"] == summary["output_tokens"]
    rows = [json.loads(line) for line in httpx.get(live_agent.api + "/v1/runs/first/requests").text.splitlines()]
    assert summary["requests_completed"] > 0
    assert sum(1 for r in rows if r["ok"]) == summary["requests_completed"]
    assert [r["run_id"] for r in httpx.get(live_agent.api + "/v1/runs").json()] == ["first"]
    assert httpx.get(live_agent.api + "/v1/runs/nope").status_code == 404
    tokens = metric_values(live_agent.metrics, "rackscope_tokens_total")
    assert tokens, "workload tokens reach the agent's metrics endpoint"


def test_cancel_stops_a_run_and_keeps_a_partial_summary(live_agent: LiveAgent) -> None:
    r = httpx.post(live_agent.api + "/v1/runs", json={"engine": "sim", "duration_s": 60, "run_id": "long"})
    assert r.status_code == 201
    time.sleep(0.5)
    assert httpx.post(live_agent.api + "/v1/runs/long/cancel").status_code == 200
    done = wait_for(lambda: (v := httpx.get(live_agent.api + "/v1/runs/long").json())["status"] == "cancelled" and v)
    assert done["summary"]["complete"] is False


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"scenario": "chaos"}, "scenario"),
        ({"engine": "openai"}, "url"),
        ({"duration_s": -3}, "duration"),
        ({"start_at": 1.0, "duration_s": 1}, "start_at"),
        ({"flux_capacitor": True}, "flux_capacitor"),
    ],
)
def test_bad_run_requests_get_422(live_agent: LiveAgent, body: dict, reason: str) -> None:
    r = httpx.post(live_agent.api + "/v1/runs", json=body)
    assert r.status_code == 422, r.text
    assert reason in r.text


def test_faults_need_a_simulated_node() -> None:
    live, stop = start_agent()
    try:
        live.agent.sim_gpus = None  # as on an NVML node
        r = httpx.post(live.api + "/v1/faults", json={"fault": "power-cap"})
        assert r.status_code == 400 and "--source sim" in r.text
    finally:
        stop()


def test_openapi_is_served(live_agent: LiveAgent) -> None:
    spec = httpx.get(live_agent.api + "/openapi.json").json()
    assert {"/healthz", "/v1/node", "/v1/faults", "/v1/runs", "/v1/runs/{run_id}/cancel"} <= set(spec["paths"])
    assert httpx.get(live_agent.api + "/docs").status_code == 200
