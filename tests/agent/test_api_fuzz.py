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
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from schemathesis.checks import not_a_server_error

from tests.agent.conftest import AgentProcess, spawn_agent
from tests.helpers import stop_process, wait_for

# Hypothesis warns when the global `random` moves while a strategy runs. Here the strategies are
# schemathesis' and the agent is another process; what can move it is a thread an earlier test left
# in this process (an SDK exporter, a server). That is no flaw in these tests' generation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)

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
    """Sequences that follow the schema's links: start a run, then read, cancel and fetch the
    record and rows of the run id it returned, in any order and against runs in any state.

    The rules draw the same values whatever the agent answers (an id is picked by index among
    the ids seen so far): generation that depended on the agent's timing (a run still finishing,
    a 409 instead of a 201) would be flaky by construction, as schemathesis' own link-following
    state machine is against a server whose runs take real time."""
    agent, api = agent_process(tmp_path / "results")
    schema = httpx.get(api + "/openapi.json", timeout=10).json()
    links = schema["paths"]["/v1/runs"]["post"]["responses"]["201"]["links"]
    followed = {link["operationId"] for link in links.values()}
    seen: dict[str, int] = {}
    client = httpx.Client(base_url=api, timeout=30)

    def call(method: str, path: str, template: str, **kwargs: Any) -> httpx.Response:
        response = client.request(method, path, **kwargs)
        key = f"{method} {template} {response.status_code}"
        seen[key] = seen.get(key, 0) + 1
        assert response.status_code < 500, (key, response.text[:300])
        return response

    bodies = st.fixed_dictionaries(
        {"engine": st.just("sim"), "gpus": st.integers(1, 2)},
        optional={
            "duration_s": st.floats(0.05, 2.0),
            "requests": st.integers(1, 50),
            "scenario": st.sampled_from(["offline", "concurrency", "server", "sweep"]),
            "concurrency": st.integers(0, 40),
            "rate": st.floats(0.0, 50.0),
            "sweep": st.lists(st.integers(1, 8), max_size=3),
            "output_len": st.integers(1, 64),
            "run_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True),
        },
    )

    # Bodies the agent accepts, so every sequence has runs to follow the links to; the rule
    # above mixes in bodies it may refuse.
    valid_bodies = st.fixed_dictionaries({
        "engine": st.just("sim"),
        "gpus": st.integers(1, 2),
        "scenario": st.just("concurrency"),
        "concurrency": st.integers(1, 16),
        "duration_s": st.floats(0.05, 2.0),
        "output_len": st.integers(1, 64),
    })

    class Runs(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ids: list[str] = []

        @initialize(body=valid_bodies)
        def first_run(self, body: dict[str, Any]) -> None:
            response = call("POST", "/v1/runs", "/v1/runs", json=body)
            assert response.status_code == 201, response.text[:300]  # the agent is idle between sequences
            self.ids.append(response.json()["run_id"])

        def pick(self, index: int) -> str:
            return self.ids[index % len(self.ids)] if self.ids else "no-such-run"

        @rule(body=bodies)
        def start(self, body: dict[str, Any]) -> None:
            response = call("POST", "/v1/runs", "/v1/runs", json=body)
            if response.status_code == 201:
                self.ids.append(response.json()["run_id"])

        @rule(index=st.integers(0, 7))
        def get_run(self, index: int) -> None:
            run_id = self.pick(index)
            response = call("GET", f"/v1/runs/{run_id}", "/v1/runs/{run_id}")
            if run_id in self.ids:
                assert response.status_code == 200 and response.json()["run_id"] == run_id

        @rule(index=st.integers(0, 7))
        def cancel_run(self, index: int) -> None:
            call("POST", f"/v1/runs/{self.pick(index)}/cancel", "/v1/runs/{run_id}/cancel")

        @rule(index=st.integers(0, 7))
        def get_record(self, index: int) -> None:
            call("GET", f"/v1/runs/{self.pick(index)}/record", "/v1/runs/{run_id}/record")

        @rule(index=st.integers(0, 7))
        def get_requests(self, index: int) -> None:
            call("GET", f"/v1/runs/{self.pick(index)}/requests", "/v1/runs/{run_id}/requests")

        @invariant()
        def at_most_one_run_is_active(self) -> None:
            runs = call("GET", "/v1/runs", "/v1/runs").json()
            assert sum(r["status"] in ("pending", "running") for r in runs) <= 1

        def teardown(self) -> None:  # each sequence starts with the agent idle again
            for run_id in self.ids:
                client.post(f"/v1/runs/{run_id}/cancel")
            wait_for("the agent idle", lambda: not any(
                r["status"] in ("pending", "running") for r in client.get("/v1/runs").json()), timeout_s=30)

    try:
        run_state_machine_as_test(Runs, settings=settings(
            max_examples=STATEFUL_EXAMPLES, stateful_step_count=6, deadline=None,
            suppress_health_check=list(HealthCheck), database=None))
        # The links the schema declares are the calls made on the returned id, and they were made.
        assert followed == {"get_run", "cancel_run", "get_record"}
        assert any(k.startswith("POST /v1/runs 201") for k in seen), seen
        assert any(k.startswith("GET /v1/runs/{run_id} 200") for k in seen), seen
        assert client.get("/healthz").json()["status"] == "ok"
    finally:
        client.close()
        stop_process(agent.proc)
