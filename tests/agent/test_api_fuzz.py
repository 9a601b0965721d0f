"""Fuzz the control API from its own OpenAPI schema against a real agent: never a 5xx.

Every operation on its own, then sequences that follow the schema's links (start a run, read
it, cancel it, fetch its record) so calls meet the state earlier ones left behind.

The agent is a process of its own: in this process its runs would draw from the global
`random` while Hypothesis generates cases, which Hypothesis rightly reports as flaky generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.agent.conftest import AgentProcess, spawn_agent
from tests.helpers import stop_process

EXAMPLES_PER_OPERATION = 40
STATEFUL_EXAMPLES = 25


def agent_process(results: Path) -> tuple[AgentProcess, str]:
    agent = spawn_agent("--source", "sim", "--gpus", "2", "--gpu-model", "h100", "--rack", "r1", "--node", "n01",
                        "--interval", "0.2", "--metrics-port", "0", "--api-port", "0", "--results-dir", str(results))
    return agent, f"http://127.0.0.1:{agent.api_port}"


@pytest.mark.slow
def test_no_server_errors_on_any_operation(tmp_path: Path) -> None:
    results = tmp_path / "results"
    agent, api = agent_process(results)
    calls: dict[str, int] = {}
    try:
        schema = schemathesis.openapi.from_url(api + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {"/v1/faults", "/v1/runs", "/v1/runs/{run_id}/cancel"} <= {op.path for op in operations}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
            def fuzz(case: schemathesis.Case) -> None:
                key = f"{case.method} {case.path}"
                calls[key] = calls.get(key, 0) + 1
                case.call_and_validate(checks=[not_a_server_error], timeout=30)

            fuzz()
        assert len(calls) == len(operations)
        # Parameterless GETs have one possible case; everything with a body or a path gets many.
        assert calls["POST /v1/faults"] >= 20 and calls["POST /v1/runs"] >= 20, calls
        assert httpx.get(api + "/healthz").json()["status"] == "ok"  # and it survived
        assert all(p.parent == results for p in tmp_path.rglob("*") if p != results)  # records only there
    finally:
        stop_process(agent.proc)


@pytest.mark.slow
def test_no_server_errors_along_the_schema_links(tmp_path: Path) -> None:
    agent, api = agent_process(tmp_path / "results")
    seen: dict[str, int] = {}
    try:
        schema = schemathesis.openapi.from_url(api + "/openapi.json")
        base = schema.as_state_machine()

        class Runs(base):  # type: ignore[misc, valid-type]
            def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
                key = f"{case.method} {case.operation.path} {response.status_code}"
                seen[key] = seen.get(key, 0) + 1
                case.validate_response(response, checks=[not_a_server_error], transport_kwargs=kwargs)

            def teardown(self) -> None:  # each scenario starts with the agent free again
                for run in httpx.get(f"{api}/v1/runs", timeout=10).json():
                    if run["status"] in ("pending", "running"):
                        httpx.post(f"{api}/v1/runs/{run['run_id']}/cancel", timeout=10)

        Runs.run(settings=settings(max_examples=STATEFUL_EXAMPLES, deadline=None, stateful_step_count=6,
                                   suppress_health_check=list(HealthCheck)))
        # The links were followed: runs were started and then read through the id they returned.
        assert any(k.startswith("POST /v1/runs 201") for k in seen), seen
        assert any(k.startswith("GET /v1/runs/{run_id} 200") for k in seen), seen
        assert httpx.get(api + "/healthz").json()["status"] == "ok"
    finally:
        stop_process(agent.proc)
