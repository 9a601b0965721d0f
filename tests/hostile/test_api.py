"""The control API against hostile callers: a real ``rackscope agent --source sim`` process under
an address-space limit, driven over 127.0.0.1.

Each test is one class of attack: names that leave the results or data directory, numbers
that ask for unbounded work, wrong types, bodies too large to hold, a bad config sent while
a run is active, a foreign Host header (DNS rebinding), a wrong token, and credentials in a
server URL that must never be shown back.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, rackscope_command, start_limited, stop_process, wait_for

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-hostile-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUICK_RUN: dict[str, Any] = {"engine": "sim", "scenario": "concurrency", "concurrency": 2, "output_len": 4,
                             "requests": 4, "warmup_auto": False}
MIB = 1024 * 1024
# The agent's resident memory may grow this much over a test: far below what the attacks asked for.
RSS_GROWTH_LIMIT_MIB = 64


class Agent:
    """``rackscope agent`` as a subprocess; stderr is drained by a thread and kept."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.results = root / "results"
        args = ["--source", "sim", "--gpus", "1", "--gpu-model", "h100", "--rack", "r1", "--node", "n1",
                "--metrics-port", "0", "--api-port", "0", "--results-dir", str(self.results), *extra]
        self.proc = start_limited(rackscope_command("agent", *args), stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.port = 0
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            wait_for("the agent's ready line", lambda: self.port or self.proc.poll() is not None, timeout_s=60)
        except AssertionError:
            self.stop()
            raise
        assert self.port, "agent exited:\n" + "".join(self.lines)
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"rackscope agent ready .*api_port=(\d+)", line)
            if match:
                self.port = int(match.group(1))

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        return kib / 1024

    def post_run(self, body: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + "/v1/runs", json=body, headers=AUTH, timeout=30, **kwargs)

    def wait_done(self, run_id: str, timeout_s: float = 60) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            view = httpx.get(f"{self.url}/v1/runs/{run_id}", timeout=10).json()
            return view if view["status"] not in ("pending", "running") else None

        return wait_for(f"run {run_id} to end", done, timeout_s=timeout_s)

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-api")
    data = root / "data"
    data.mkdir()
    (data / "prompts.jsonl").write_text('{"prompt": "hello there", "max_tokens": 3}\n' * 4)
    (data / "sub").mkdir()
    (root / "secret.jsonl").write_text('{"prompt": "not yours", "max_tokens": 3}\n')
    (data / "leak.jsonl").symlink_to(root / "secret.jsonl")
    (data / "zero.jsonl").symlink_to("/dev/zero")
    os.mkfifo(data / "pipe.jsonl")
    with (data / "big.jsonl").open("wb") as f:  # over the agent's 1 MiB limit below
        f.write(b'{"prompt": "x", "max_tokens": 1}\n' * (MIB // 16))
    token_file = root / "token"
    token_file.write_text(f"  {TOKEN}\n")
    token_file.chmod(0o600)
    return root


@pytest.fixture(scope="module")
def agent(root: Path) -> Iterator[Agent]:
    live = Agent(root, "--data-dir", str(root / "data"), "--dataset-max-mib", "1",
                 "--api-token-file", str(root / "token"))
    yield live
    live.stop()


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../../escaped", "/tmp/absolute", "a\x00b", "line\nbreak", "..", ".hidden",
                                    "x" * 129, "a/b", ""])
def test_run_ids_that_are_not_plain_names_are_refused(agent: Agent, root: Path, run_id: str) -> None:
    before = files_under(root)
    r = agent.post_run({**QUICK_RUN, "run_id": run_id})
    assert r.status_code == 422, r.text
    assert "run_id" in r.text
    assert files_under(root) == before
    assert not (root.parent / "escaped.json").exists()
    assert not Path("/tmp/absolute.json").exists()


def test_a_used_run_id_never_replaces_its_files(agent: Agent) -> None:
    (agent.results / "taken.json").parent.mkdir(parents=True, exist_ok=True)
    (agent.results / "taken.json").write_text('{"theirs": true}')
    r = agent.post_run({**QUICK_RUN, "run_id": "taken"})
    assert r.status_code == 409 and "already used" in r.text
    assert (agent.results / "taken.json").read_text() == '{"theirs": true}'
    assert agent.post_run({**QUICK_RUN, "run_id": "mine"}).status_code == 201
    assert agent.wait_done("mine")["status"] == "completed"
    again = agent.post_run({**QUICK_RUN, "run_id": "mine"})
    assert again.status_code == 409 and "already used" in again.text


@pytest.mark.parametrize(
    ("dataset", "reason"),
    [
        ("/etc/passwd", "relative"),
        ("../secret.jsonl", "'..'"),
        ("/dev/zero", "relative"),
        ("zero.jsonl", "outside"),
        ("leak.jsonl", "outside"),
        ("pipe.jsonl", "not a regular file"),
        ("sub", "directory"),
        ("big.jsonl", "limit"),
        ("missing.jsonl", "No such file"),
    ],
)
def test_datasets_resolve_only_to_regular_files_inside_the_data_dir(agent: Agent, dataset: str, reason: str) -> None:
    started = time.monotonic()
    r = agent.post_run({**QUICK_RUN, "dataset": dataset})
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"]
    assert time.monotonic() - started < 5  # a FIFO or a device never blocks the agent
    assert "not yours" not in r.text


def test_a_dataset_inside_the_data_dir_runs(agent: Agent) -> None:
    r = agent.post_run({**QUICK_RUN, "dataset": "prompts.jsonl", "run_id": "from-data-dir"})
    assert r.status_code == 201, r.text
    view = agent.wait_done("from-data-dir")
    assert view["status"] == "completed"
    assert view["summary"]["output_tokens"] == 4 * 3
    assert view["config"]["dataset"] == "prompts.jsonl"


def test_an_agent_without_a_data_dir_refuses_every_dataset(tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello", "max_tokens": 3}\n')
    bare = Agent(tmp_path)
    try:
        for name in ("prompts.jsonl", str(tmp_path / "prompts.jsonl")):
            r = httpx.post(bare.url + "/v1/runs", json={**QUICK_RUN, "dataset": name}, timeout=30)
            assert r.status_code == 422, r.text
            assert "--data-dir" in r.json()["detail"]
        assert httpx.get(bare.url + "/v1/runs", timeout=10).json() == []
    finally:
        bare.stop()


# --- numbers and types ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"concurrency": 100_000_000}, "concurrency"),
        ({"requests": 10**12, "scenario": "offline", "concurrency": None}, "requests"),
        ({"duration_s": 1e12}, "duration_s"),
        ({"input_len": 2**40}, "input_len"),
        ({"workers": 100_000}, "workers"),
        ({"sweep": list(range(1, 10_000)), "scenario": "sweep"}, "sweep"),
        ({"rate": 1e300, "scenario": "server"}, "rate"),
        ({"seed": 2**80}, "seed"),
        ({"request_deadline_s": 1e9}, "request_deadline_s"),
    ],
)
def test_numbers_beyond_their_bounds_are_refused_fast_and_cost_nothing(
    agent: Agent, body: dict[str, Any], field: str
) -> None:
    rss_before = agent.rss_mib()
    started = time.monotonic()
    r = agent.post_run({**QUICK_RUN, **body})
    assert r.status_code == 422, r.text
    assert time.monotonic() - started < 2
    assert field in r.text
    assert httpx.get(agent.url + "/healthz", timeout=5).json()["status"] == "ok"
    assert agent.rss_mib() - rss_before < RSS_GROWTH_LIMIT_MIB
    assert not [run for run in httpx.get(agent.url + "/v1/runs", timeout=10).json() if run["status"] == "running"]


@pytest.mark.parametrize(
    "body",
    [{"concurrency": True}, {"requests": 4.0}, {"concurrency": "2"}, {"duration_s": True}, {"warmup_auto": 1},
     {"output_len": None, "input_len": [1]}],
)
def test_wrong_types_are_refused(agent: Agent, body: dict[str, Any]) -> None:
    r = agent.post_run({**QUICK_RUN, **body})
    assert r.status_code == 422, r.text
    locs = [e["loc"][-1] for e in r.json()["detail"]]
    assert set(locs) <= set(body)


def test_a_20_mb_body_gets_413_with_a_small_answer(agent: Agent) -> None:
    rss_before = agent.rss_mib()
    r = agent.post_run({**QUICK_RUN, "model": "m" * (20 * MIB)})
    assert r.status_code == 413
    assert len(r.content) < 200
    assert "64" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"model": "'
        for _ in range(20):
            yield b"m" * MIB
        yield b'"}'

    r = httpx.post(agent.url + "/v1/runs", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and len(r.content) < 200
    assert agent.rss_mib() - rss_before < RSS_GROWTH_LIMIT_MIB
    assert httpx.get(agent.url + "/healthz", timeout=5).status_code == 200


def test_a_refusal_echoes_only_a_little_of_the_input(agent: Agent) -> None:
    r = agent.post_run({**QUICK_RUN, "scenario": "s" * 60_000, "concurrency": "9" * 4000})
    assert r.status_code == 422
    assert len(r.content) < 2_000
    assert "s" * 100 not in r.text


def test_a_bad_config_while_a_run_is_active_gets_422_not_409(agent: Agent) -> None:
    r = agent.post_run({"engine": "sim", "scenario": "concurrency", "concurrency": 2, "duration_s": 60,
                        "run_id": "busy"})
    assert r.status_code == 201, r.text
    try:
        bad = agent.post_run({"engine": "sim", "scenario": "concurrency", "concurrency": 10**9, "duration_s": 1})
        assert bad.status_code == 422, bad.text
        unusable = agent.post_run({"engine": "openai", "duration_s": 1})  # parses, but needs a url
        assert unusable.status_code == 422 and "url" in unusable.text
        good = agent.post_run({**QUICK_RUN, "run_id": "second"})
        assert good.status_code == 409 and "one run per agent" in good.text
    finally:
        httpx.post(agent.url + "/v1/runs/busy/cancel", headers=AUTH, timeout=10)
    assert agent.wait_done("busy")["status"] == "cancelled"


# --- who may call ----------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.0.0.1",
                                  "localhost.", "127.0.0.2"])
def test_a_foreign_host_header_is_refused(agent: Agent, host: str) -> None:
    r = httpx.get(agent.url + "/v1/node", headers={"Host": host}, timeout=10)
    assert r.status_code == 400
    assert "Host" in r.json()["detail"]
    r = httpx.post(agent.url + "/v1/runs", json=QUICK_RUN, headers={**AUTH, "Host": host}, timeout=10)
    assert r.status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:9470"])
def test_loopback_host_headers_are_served(agent: Agent, host: str) -> None:
    assert httpx.get(agent.url + "/healthz", headers={"Host": host}, timeout=10).status_code == 200


def test_the_token_file_is_the_token(agent: Agent) -> None:
    assert httpx.post(agent.url + "/v1/runs", json=QUICK_RUN, timeout=10).status_code == 401
    wrong = httpx.post(agent.url + "/v1/runs", json=QUICK_RUN, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    padded = httpx.post(agent.url + "/v1/runs", json=QUICK_RUN, headers={"Authorization": f"Bearer  {TOKEN}"},
                        timeout=10)
    assert padded.status_code == 401
    r = agent.post_run({**QUICK_RUN, "run_id": "with-token"})
    assert r.status_code == 201, r.text
    agent.wait_done("with-token")
    assert TOKEN not in "".join(agent.lines)


# --- what is shown back ----------------------------------------------------------------------------
def test_url_credentials_are_never_shown_or_stored(agent: Agent, tmp_path: Path) -> None:
    server = start_limited(rackscope_command("--log-level", "warning", "serve-sim", "--port", "0"),
                           stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line).group(1)  # type: ignore[union-attr]
        secret = "hunter2-pass"
        url = f"http://alice:{secret}@127.0.0.1:{port}"
        r = agent.post_run({"engine": "openai", "url": url, "model": "llama2-70b", "scenario": "concurrency",
                            "concurrency": 2, "requests": 4, "output_len": 4, "run_id": "creds"})
        assert r.status_code == 201, r.text
        assert secret not in r.text and "alice" not in r.text
        view = agent.wait_done("creds")
        assert view["status"] == "completed", view
        assert view["config"]["url"] == f"http://***@127.0.0.1:{port}"
        record = httpx.get(agent.url + "/v1/runs/creds/record", timeout=10)
        assert record.status_code == 200 and record.json()["config"]["url"] == view["config"]["url"]
        shown = [httpx.get(agent.url + path, timeout=10).text for path in ("/v1/runs", "/v1/runs/creds", "/v1/logs")]
        on_disk = [p.read_text() for p in agent.results.iterdir() if p.name.startswith("creds")]
        assert len(on_disk) == 2
        for text in [record.text, *shown, *on_disk, "".join(agent.lines)]:
            assert secret not in text and "alice" not in text
    finally:
        stop_process(server)


def test_url_credentials_stay_hidden_when_the_run_fails(agent: Agent) -> None:
    secret = "s3cret-in-a-dead-url"
    port = free_port()  # nothing listens there: the engine's error message names the URL
    r = agent.post_run({"engine": "openai", "url": f"http://bob:{secret}@127.0.0.1:{port}/v1", "requests": 2,
                        "run_id": "dead-url"})
    assert r.status_code == 201, r.text
    view = agent.wait_done("dead-url")
    assert view["status"] == "failed" and view["error"]
    assert secret not in str(view) and "bob" not in str(view)
    assert secret not in httpx.get(agent.url + "/v1/logs", timeout=10).text
    assert secret not in "".join(agent.lines)
