"""Fuzz the control API from its own OpenAPI schema against a real agent: never a 5xx."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.agent.conftest import start_agent

EXAMPLES_PER_OPERATION = 40


def test_no_server_errors_on_any_operation() -> None:
    live, stop = start_agent()
    calls: dict[str, int] = {}
    try:
        schema = schemathesis.openapi.from_url(live.api + "/openapi.json")
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
        assert httpx.get(live.api + "/healthz").json()["status"] == "ok"  # and it survived
    finally:
        stop()
