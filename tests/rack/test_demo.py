"""``rackscope demo``: fault specs, the scrape config, the terminal view from constructed
state, and the whole demo in ``--json`` mode against the GPU profile's figures."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from rackscope.errors import ConfigError
from rackscope.rack.demo import (
    ENGINE_LOGGER,
    DemoOptions,
    NodeFault,
    engine_lines_grouped,
    logs_through,
    node_names,
    resolve_node,
    scrape_config,
)
from rackscope.rack.demo_view import REFERENCE_TOKENS_PER_S, NodeLive, RackLive, final_state, render, summary_text
from rackscope.simgpu import profile

NODES18 = node_names(18)


def test_node_names_and_lookup() -> None:
    assert NODES18[0] == "n01"
    assert NODES18[-1] == "n18"
    assert node_names(120)[0] == "n001"
    assert resolve_node("n03", NODES18) == resolve_node("3", NODES18) == resolve_node("N3", NODES18) == "n03"
    with pytest.raises(ConfigError, match="no node"):
        resolve_node("n19", NODES18)


def test_inject_specs() -> None:
    f = NodeFault.parse("power-cap=700@n03", NODES18)
    assert (f.node, f.fault.name, f.fault.value, f.fault.gpu) == ("n03", "power-cap", 700.0, None)
    f = NodeFault.parse("thermal-throttle@5/1", NODES18)
    assert (f.node, f.fault.name, f.fault.gpu) == ("n05", "thermal-throttle", 1)
    for bad in ("power-cap", "@n01", "bogus@n01", "power-cap=x@n01", "power-cap@n40", "gpu-drop@n01/z"):
        with pytest.raises(ConfigError):
            NodeFault.parse(bad, NODES18)
    with pytest.raises(ConfigError):
        DemoOptions(inject=["power-cap@n30"]).validate()
    with pytest.raises(ConfigError):
        DemoOptions(nodes=0).validate()
    with pytest.raises(ConfigError):
        DemoOptions(gpu_model="a100").validate()


def test_scrape_config_is_valid_prometheus_config(tmp_path: Path) -> None:
    text = scrape_config(["127.0.0.1:9464", "127.0.0.1:9465"])
    parsed = yaml.safe_load(text)
    job = parsed["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464", "127.0.0.1:9465"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    res = subprocess.run(
        [promtool, "check", "config", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _state() -> RackLive:
    nodes = [
        NodeLive(
            node=n,
            status="running",
            tokens_per_s=61_000.0,
            power_w=5_300.0,
            gpu_power_w=[1_330.0] * 4,
            gpu_limit_w=1_400.0,
        )
        for n in NODES18
    ]
    nodes[2].tokens_per_s, nodes[2].faults = 44_000.0, ["power-cap"]
    nodes[2].gpu_power_w = [700.0] * 4
    nodes[6].status, nodes[6].tokens_per_s, nodes[6].gpu_power_w = "lost", 0.0, [None, None, None, None]
    return RackLive(
        rack="nvl72",
        gpu_model="4 x NVIDIA GB300",
        nodes=nodes,
        elapsed_s=12.5,
        duration_s=20.0,
        phase="running",
        tokens_per_j=11.4,
        expected_tokens_per_s=72 * 15_291.0,
    )


def test_view_renders_banner_rack_total_and_stragglers() -> None:
    console = Console(record=True, width=160, color_system="truecolor", file=io.StringIO())
    console.print(render(_state()))
    text = console.export_text(clear=False)
    assert "SIMULATED RACK" in text
    total = 16 * 61_000 + 44_000
    assert f"{total:,}" in text
    assert f"{total / REFERENCE_TOKENS_PER_S:6.1%}".strip() in text
    assert "1,100,948" in text
    assert "95.4 kW" in text.replace(",", "")  # 18 x 5.3 kW
    assert "11.40 tokens/J" in text
    rows = [line.strip("│ ") for line in text.splitlines()]
    lines = {row.split()[0]: row for row in rows if row.split() and row.split()[0] in NODES18}
    assert len(lines) == 18
    assert "STRAGGLER" in lines["n03"]
    assert "power-cap" in lines["n03"]
    assert "lost" in lines["n07"]
    assert "STRAGGLER" not in lines["n07"]
    assert "STRAGGLER" not in lines["n01"]
    assert lines["n01"].count("■") == 4
    # Straggler rows are drawn bold yellow, failed ones bold red, the others green.
    ansi = console.export_text(styles=True)
    assert "\x1b[1;33mn03" in ansi
    assert "\x1b[1;31mn07" in ansi
    assert "\x1b[32mn01" in ansi


def test_final_frame_shows_the_measured_figures() -> None:
    record = {
        "summary": {"duration_s": 20.0, "output_tokens_per_j": 11.2, "straggler_threshold": 0.95},
        "nodes": [{"node": n, "status": "completed", "output_tokens_per_s": 60_000.0, "power_w": 5_000.0}
                  for n in NODES18],
    }
    record["nodes"][6] = {"node": "n07", "status": "lost", "output_tokens_per_s": None, "power_w": None}
    final = final_state(_state(), record)
    assert final.phase.startswith("done")
    assert final.elapsed_s == 20.0
    assert final.tokens_per_j == 11.2
    assert final.tokens_per_s == 17 * 60_000.0
    n03, n07 = final.nodes[2], final.nodes[6]
    assert (n03.tokens_per_s, n03.power_w) == (60_000.0, 5_000.0)
    assert (n03.faults, n03.gpu_power_w) == (["power-cap"], [700.0] * 4)  # kept from the live frame
    assert (n07.status, n07.tokens_per_s) == ("lost", 0.0)


def _record(**summary: Any) -> dict[str, Any]:
    base = {
        "complete": True,
        "nodes": 18,
        "nodes_completed": 18,
        "gpus": 72,
        "output_tokens_per_s": 1_090_000.0,
        "output_tokens_per_s_per_gpu": 15_138.9,
        "node_output_tokens_per_s": {"min": 57_600.0, "median": 61_760.0, "mean": 60_555.0, "max": 62_800.0},
        "power_w": 96_000.0,
        "energy_j": 1.92e6,
        "output_tokens_per_j": 11.35,
        "straggler_threshold": 0.95,
        "stragglers": [],
        "failed_nodes": [],
    }
    base.update(summary)
    return {
        "schema": "rackscope.rack/1",
        "rack_run_id": "abc",
        "rack": "nvl72",
        "summary": base,
        "environment": {"simulated": True},
    }


def test_summary_text() -> None:
    text = summary_text(
        _record(
            stragglers=[
                {
                    "node": "n03",
                    "output_tokens_per_s": 44_000.0,
                    "fraction_of_median": 0.7124,
                    "shortfall_tokens_per_s": 17_760.0,
                }
            ]
        ),
        bundle="out",
    )
    assert "SIMULATED" in text
    assert "complete, 18/18 nodes, 72 GPUs" in text
    assert "1,090,000" in text
    assert "99.0% of the 1,100,948" in text
    assert "min 57,600 / median 61,760 / mean 60,555 / max 62,800" in text
    assert "96.0 kW" in text
    assert "11.35 tokens/J" in text
    assert "n03" in text
    assert "71.2% of median" in text
    assert "17,760" in text
    assert "bundle           out" in text
    failed = summary_text(_record(complete=False, failed_nodes=[{"node": "n07", "status": "lost", "error": "gone"}]))
    assert "INCOMPLETE" in failed
    assert "FAILED n07 (lost): gone" in failed


# --- the whole demo -------------------------------------------------------------------------------
def _demo(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rackscope", "demo", *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def _expected(nodes: int, gpus: int, model: str = "gb300") -> float:
    return nodes * gpus * profile(model).llama2_70b_tokens_per_s


@pytest.mark.slow
def test_demo_json_small_rack(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    res = _demo("--nodes", "4", "--gpus-per-node", "4", "--duration", "3", "--json", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(res.stdout)  # stdout is the record and nothing else
    s = record["summary"]
    assert record["schema"] == "rackscope.rack/1"
    assert record["environment"]["simulated"] is True
    assert s["complete"] is True
    assert s["nodes"] == 4
    assert s["gpus"] == 16
    assert s["output_tokens_per_s"] == pytest.approx(_expected(4, 4), rel=0.10)
    assert s["energy_j"] > 0
    assert 0 < s["output_tokens_per_j"] < 100
    assert "Prometheus scrape config" in res.stderr
    assert "/metrics" in res.stderr
    assert (out / "rack.json").exists()
    assert (out / "prometheus.yml").exists()
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["n01", "n02", "n03", "n04"]


@pytest.mark.slow
def test_demo_default_rack_with_a_fault() -> None:
    res = _demo(
        "--nodes",
        "18",
        "--gpus-per-node",
        "4",
        "--gpu-model",
        "gb300",
        "--duration",
        "8",
        "--json",
        "--inject",
        "power-cap=700@n03",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout)["summary"]
    assert s["complete"] is True
    assert s["nodes"] == 18
    assert s["gpus"] == 72
    assert s["output_tokens_per_s"] == pytest.approx(_expected(18, 4), rel=0.10)
    # The capped node is the slowest straggler by far (an 8 s window leaves others some noise).
    assert s["stragglers"][0]["node"] == "n03"
    assert s["stragglers"][0]["fraction_of_median"] < 0.8
    assert all(st["fraction_of_median"] > 0.85 for st in s["stragglers"][1:])


def test_demo_rejects_bad_flags() -> None:
    res = _demo("--inject", "power-cap@n40", "--json", timeout=60)
    assert res.returncode == 2
    assert "no node 'n40'" in res.stderr
    assert res.stdout == ""


# --- log lines and the live view -------------------------------------------------------------------
FORGED = "2026-01-01 00:00:00,000 ERROR rackscope.agent: forged"


def test_log_lines_go_through_the_console_escaped_and_handlers_come_back() -> None:
    console = Console(record=True, width=200, file=io.StringIO())
    root = logging.getLogger()
    before = root.handlers[:]
    with logs_through(console):
        logging.getLogger("rackscope.test").warning("peer said [bold]hi[/bold]\n%s", FORGED)
    assert root.handlers == before
    lines = console.export_text().splitlines()
    assert len(lines) == 1  # the newline is escaped, not a second (forged) line
    assert lines[0].endswith(r"WARNING rackscope.test: peer said [bold]hi[/bold]\n" + FORGED)


def test_identical_engine_lines_become_one_and_differences_stay(caplog: pytest.LogCaptureFixture) -> None:
    engine = logging.getLogger(ENGINE_LOGGER)
    fmt = "simulated engine %s on %d x %s"
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER), engine_lines_grouped(3):
        engine.info(fmt, "llama2-70b", 4, "NVIDIA GB300")
        engine.info(fmt, "llama2-70b", 3, "NVIDIA GB300")  # a node with a dropped GPU, say
        engine.info("simulated engine: failing %d requests", 2)  # other lines pass as they come
        assert caplog.messages == ["simulated engine: failing 2 requests"]  # the rest wait for every node
        engine.info(fmt, "llama2-70b", 4, "NVIDIA GB300")
    assert caplog.messages == [
        "simulated engine: failing 2 requests",
        "simulated engine llama2-70b on 4 x NVIDIA GB300, on 2 nodes",
        "simulated engine llama2-70b on 3 x NVIDIA GB300, on 1 node",
    ]
    assert engine.filters == []


def test_engine_lines_held_for_nodes_that_never_started_are_logged_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = logging.getLogger(ENGINE_LOGGER)
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER), engine_lines_grouped(18):
        for _ in range(17):
            engine.info("simulated engine %s on %d x %s", "llama2-70b", 4, "NVIDIA GB300")
        assert caplog.messages == []
    assert caplog.messages == ["simulated engine llama2-70b on 4 x NVIDIA GB300, on 17 nodes"]


_TERMINAL_CODE = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|[\s\S]")


def _screen(raw: str) -> list[str]:
    """What a terminal (no line wrapping, endless scrollback) shows after ``raw``: enough of one
    for rich's live view, which moves up (``ESC[nA``) and clears lines (``ESC[2K``) to redraw."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for m in _TERMINAL_CODE.finditer(raw):
        text, params, final = m.group(), m.group(1), m.group(2)
        if final == "A":
            row = max(0, row - int(params or 1))
        elif final == "K":
            del lines[row][0 if params == "2" else col :]
        elif final is not None or (text < " " and text not in "\r\n"):
            continue  # colours, cursor visibility, bells
        elif text == "\r":
            col = 0
        elif text == "\n":
            row += 1
            lines.extend([] for _ in range(row + 1 - len(lines)))
        else:
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = text
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_screen_follows_cursor_moves() -> None:
    assert _screen("a\r\nb\r\nc\r\x1b[2K\x1b[1A\x1b[2K\x1b[1A\x1b[2Kx\r\ny\r\n") == ["x", "y", ""]


def _demo_on_terminal(*args: str, cols: int = 220, rows: int = 60, timeout: float = 150.0) -> tuple[int, str]:
    """Runs the demo with a pseudo-terminal as its stdin, stdout and stderr; returns its exit
    code and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "demo", *args], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the demo wrote nothing for {timeout:g} s"
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the demo closed its end of the terminal (it has exited)
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _number(pattern: str, line: str) -> float:
    m = re.search(pattern, line)
    assert m is not None, f"{pattern!r} not in {line!r}"
    return float(m.group(1).replace(",", ""))


@pytest.mark.slow
def test_demo_view_on_a_terminal() -> None:
    code, raw = _demo_on_terminal("--nodes", "2", "--gpus-per-node", "1", "--duration", "3")
    screen = _screen(raw)
    shown = "\n".join(screen)
    assert code == 0, shown[-3000:]
    assert raw.count("rackscope demo") > 3  # the view was redrawn, many times over
    headers = [i for i, line in enumerate(screen) if "╭" in line and "rackscope demo" in line]
    # Log lines written while the view was up left no frame behind them: one frame on screen.
    assert len(headers) == 1, shown
    frame_at = headers[0]
    during = [i for i, line in enumerate(screen) if "rackscope.rack.coordinator: starting run" in line]
    assert len(during) == 1, shown  # logged once the view was up, shown once, above the frame
    assert raw.index("rackscope demo") < raw.index("starting run")
    assert during[0] < frame_at
    engine = [line for line in screen if "simulated engine" in line]
    assert len(engine) == 1, shown
    assert engine[0].endswith(", on 2 nodes")
    assert "on 1 x NVIDIA GB300" in engine[0]
    # The last frame shows the rack record's figures, not engines that have stopped.
    frame = screen[frame_at:]
    assert any("done: measured" in line for line in frame), shown
    rate_line = next(line for line in frame if line.startswith("│ tokens/s"))
    shown_rate = _number(r"([\d,]+)\s+\(\s*[\d.]+% of", rate_line)
    summary_rate = _number(r"output tokens/s\s+([\d,]+)", next(x for x in frame if "output tokens/s" in x))
    assert shown_rate > 0
    assert shown_rate == summary_rate
    assert shown_rate == pytest.approx(_expected(2, 1), rel=0.10)
