"""What ``rackscope run --engine openai`` loads: a load generator's start-up is part of its CPU
cost, so the run imports only what it runs (no agent, rack, simulated engine, SDK or web stack)
and builds only its own command's parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rackscope.cli import COMMANDS, build_parser, named_command
from tests.runner.streaming_server import StreamingServer

# Modules the openai run path must not import (each name also covers its submodules).
NOT_FOR_THE_RUN = (
    "opentelemetry.sdk", "fastapi", "starlette", "uvicorn", "pydantic", "numpy", "aiohttp", "matplotlib",
    "grpc", "multiprocessing", "rackscope.agent", "rackscope.rack", "rackscope.dashboards", "rackscope.simgpu",
    "rackscope.runner.engines.sim", "rackscope.runner.serve_sim", "rackscope.runner.verdict",
    "prometheus_client", "http.server",
)

# Runs the command line given after it, then writes the names of the modules it had loaded.
DUMP_MODULES = """
import json, runpy, sys
out = sys.argv.pop(1)
try:
    runpy.run_module("rackscope.cli", run_name="__main__", alter_sys=True)
finally:
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
"""


def subcommands(parser: object) -> set[str]:
    actions = getattr(parser, "_subparsers")._group_actions  # noqa: B009 - argparse keeps them there
    return set(actions[0].choices)


def test_the_command_table_names_every_command_and_its_module() -> None:
    assert subcommands(build_parser()) == set(COMMANDS)
    for name in COMMANDS:
        assert name in subcommands(build_parser(name)), name
    # The run command alone: the other runner commands' flags are not even declared.
    assert subcommands(build_parser("run")) == {"run"}


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "--engine", "openai"], "run"),
        (["--log-level", "warning", "run"], "run"),
        (["--log-level=debug", "compare", "a.json"], "compare"),
        (["--help"], None),
        ([], None),
        (["--log-level"], None),
    ],
)
def test_named_command(argv: list[str], command: str | None) -> None:
    assert named_command(argv) == command


@pytest.mark.slow
def test_run_command_imports_only_what_the_run_needs(tmp_path: Path) -> None:
    with StreamingServer() as server:
        done = subprocess.run(
            [sys.executable, "-c", DUMP_MODULES, str(tmp_path / "modules.json"), "--log-level", "warning", "run",
             "--engine", "openai", "--url", server.base_url, "--model", "test-model", "--scenario", "concurrency",
             "--concurrency", "2", "--requests", "4", "--output-len", "8", "--input-len", "8", "--no-engine-metrics",
             "--output", str(tmp_path / "run.json")],
            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run.json").read_text())["summary"]["requests_completed"] == 4
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    loaded = sorted(m for m in modules if any(m == bad or m.startswith(bad + ".") for bad in NOT_FOR_THE_RUN))
    assert loaded == []
    assert "uvloop" in modules  # the client's loop
    assert "rackscope.runner.engines.openai.wire" in modules
