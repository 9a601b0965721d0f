"""The control API over real HTTP: node view, faults, tokens, runs, bad input, and a fuzz."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.conftest import LiveAgent, start_agent
from tests.helpers import wait_for


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    text = httpx.get(metrics_url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("gpu", "")] = sample.value
    return out


@pytest.mark.slow
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


@pytest.mark.slow
def test_power_cap_fault_shows_in_metrics_and_clears(live_agent: LiveAgent) -> None:
    live_agent.agent.sim_gpus[0].set_load(1.0)  # type: ignore[index]
    wait_for("GPU 0 above 600 W", lambda: metric_values(live_agent.metrics, "hw_power_watts").get("0", 0) > 600)
    r = httpx.post(live_agent.api + "/v1/faults", json={"fault": "power-cap", "gpu": 0, "value": 300})
    assert r.status_code == 200, r.text
    assert r.json()["gpus"][0]["power_cap_w"] == 300
    power = wait_for(
        "GPU 0 capped at 300 W",
        lambda: (v := metric_values(live_agent.metrics, "hw_power_watts")) and v["0"] <= 300 and v,
    )
    assert power["0"] == pytest.approx(300.0)
    throttle = {
        (s.labels["gpu"], s.labels["reason"]): s.value
        for f in text_string_to_metric_families(httpx.get(live_agent.metrics + "/metrics").text)
        for s in f.samples
        if s.name == "rackscope_gpu_throttle"
    }
    assert throttle[("0", "sw_power_cap")] == 1 and throttle[("1", "sw_power_cap")] == 0
    assert httpx.delete(live_agent.api + "/v1/faults").json()["active"] == []
    wait_for("GPU 0 above 600 W", lambda: metric_values(live_agent.metrics, "hw_power_watts").get("0", 0) > 600)


def test_gpu_drop_marks_the_gpu_down_and_keeps_the_other(live_agent: LiveAgent) -> None:
    assert httpx.post(live_agent.api + "/v1/faults", json={"fault": "gpu-drop", "gpu": 1}).status_code == 200
    up = wait_for(
        "GPU 1 down", lambda: (v := metric_values(live_agent.metrics, "rackscope_gpu_up")) and v.get("1") == 0 and v
    )
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


@pytest.mark.slow
def test_runs_one_at_a_time_with_record_and_requests(live_agent: LiveAgent, tmp_path: Path) -> None:
    live_agent.agent.runs.results_dir = str(tmp_path)
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
        "the first run completed",
        lambda: (v := httpx.get(live_agent.api + "/v1/runs/first").json())["status"] == "completed" and v,
        timeout_s=30,
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "first.requests.jsonl"]
    again = httpx.post(live_agent.api + "/v1/runs", json={"engine": "sim", "duration_s": 1.0, "run_id": "first"})
    assert again.status_code == 409 and "already used" in again.text


def test_cancel_stops_a_run_and_keeps_a_partial_summary(live_agent: LiveAgent, tmp_path: Path) -> None:
    live_agent.agent.runs.results_dir = str(tmp_path)
    r = httpx.post(live_agent.api + "/v1/runs", json={"engine": "sim", "duration_s": 60, "run_id": "long"})
    assert r.status_code == 201
    wait_for("the long run running", lambda: httpx.get(live_agent.api + "/v1/runs/long").json()["status"] == "running")
    assert httpx.post(live_agent.api + "/v1/runs/long/cancel").status_code == 200
    done = wait_for("the long run cancelled",
                    lambda: (v := httpx.get(live_agent.api + "/v1/runs/long").json())["status"] == "cancelled" and v)
    assert done["summary"]["complete"] is False
    assert (tmp_path / "long.json").stat().st_size > 0  # the partial record replaced the claimed name


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"scenario": "chaos"}, "scenario"),
        ({"engine": "openai"}, "url"),
        ({"duration_s": -3}, "duration"),
        ({"start_at": 1.0, "duration_s": 1}, "start_at"),
        ({"flux_capacitor": True}, "flux_capacitor"),
        ({"concurrency": True, "scenario": "concurrency", "duration_s": 1}, "concurrency"),
        ({"concurrency": 16_385, "scenario": "concurrency", "duration_s": 1}, "less than or equal to 16384"),
        ({"duration_s": 7 * 86_400 + 1}, "duration_s"),
        ({"run_id": "../x", "duration_s": 1}, "run_id"),
        ({"url": "ftp://x", "engine": "openai", "duration_s": 1}, "url"),
        ({"url": "http:///v1", "engine": "openai", "duration_s": 1}, "with a host"),
        ({"rack": "r9", "duration_s": 1}, "rack"),
        ({"workers": 2, "engine": "openai", "url": "http://127.0.0.1:1", "duration_s": 1}, "rackscope run --workers"),
        ({"scenario": "sweep", "sweep_over": "rate", "sweep": [1, 12_000], "duration_s": 1}, "sweep rates"),
        ({"engine": "openai", "url": "http://127.0.0.1:1", "scenario": "concurrency", "concurrency": 16_384,
          "input_len": 1_000_000, "duration_s": 1}, "prompt tokens in flight"),
        ({"dataset": "prompts.jsonl", "duration_s": 1}, "--data-dir"),
        ({"start_at": float("1e300"), "duration_s": 1}, "start_at"),
    ],
)
def test_bad_run_requests_get_422(live_agent: LiveAgent, body: dict, reason: str) -> None:
    r = httpx.post(live_agent.api + "/v1/runs", json=body)
    assert r.status_code == 422, r.text
    assert reason in r.text
    assert httpx.get(live_agent.api + "/v1/runs").json() == []


def test_validation_errors_name_the_field_and_clip_the_input(live_agent: LiveAgent) -> None:
    r = httpx.post(live_agent.api + "/v1/runs", json={"model": "m" * 5000, "concurrency": "x" * 500})
    assert r.status_code == 422
    errors = {tuple(e["loc"]): e for e in r.json()["detail"]}
    assert set(errors) == {("body", "model"), ("body", "concurrency")}
    assert len(errors[("body", "model")]["input"]) <= 40
    assert len(r.content) < 1000
    not_json = httpx.post(live_agent.api + "/v1/runs", content=b"{" + b"x" * 1000,
                          headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and len(not_json.content) < 1000


def test_unknown_and_malformed_run_ids(live_agent: LiveAgent) -> None:
    assert httpx.get(live_agent.api + "/v1/runs/nope").status_code == 404
    assert "nope" in httpx.get(live_agent.api + "/v1/runs/nope").json()["detail"]
    assert httpx.get(live_agent.api + "/v1/runs/" + "x" * 300).status_code == 422
    assert httpx.post(live_agent.api + "/v1/runs/.hidden/cancel").status_code == 422


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
    links = spec["paths"]["/v1/runs"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {"get_run", "cancel_run", "get_record"}
    body = spec["components"]["schemas"]["RunBody"]["properties"]
    assert body["concurrency"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16384}
    assert "rack" not in body and "node" not in body
