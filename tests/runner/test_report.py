"""``rackscope report``: PNGs and Markdown from real run records (the simulated engine on a
virtual clock) and from a rack record assembled over them in a results bundle."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rackscope.agent.faults import Fault, apply_fault
from rackscope.clock import VirtualClock
from rackscope.fileio import write_json
from rackscope.rack.record import NodeRun, assemble_record
from rackscope.runner.config import RunConfig
from rackscope.runner.energy import SimEnergyMeter
from rackscope.runner.engines.sim import SimEngine
from rackscope.runner.report import write_report
from rackscope.runner.results.io import write_run
from rackscope.runner.runloop import run_scenario
from rackscope.simgpu import make_node_gpus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("throughput.png", "latency_cdf.png", "power_vs_throughput.png", "tokens_per_joule.png")


async def _node_run(node: str, folder: Path, *, power_cap_w: float | None = None) -> Path:
    clock = VirtualClock()
    gpus = make_node_gpus("gb300", 2, clock, "r1", node)
    if power_cap_w is not None:
        apply_fault(gpus, Fault("power-cap", None, power_cap_w))
    engine = SimEngine(gpus, clock)
    await engine.start()
    config = RunConfig.from_dict({
        "engine": "sim", "scenario": "offline", "duration_s": 6.0, "warmup_auto": False, "node": node,
        "rack": "r1", "length_dist": "uniform", "output_len": 64, "input_len": 128, "run_id": "run1",
    })
    result = await run_scenario(engine, config, clock=clock, energy=SimEnergyMeter(gpus, node))
    await engine.stop()
    folder.mkdir(parents=True, exist_ok=True)
    return write_run(result, folder / "run1.json")


def _png_ok(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(path)
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 300


async def _make_bundle(root: Path) -> None:
    nodes = []
    for i, (node, cap) in enumerate((("n01", None), ("n02", None), ("n03", 700.0))):
        path = await _node_run(node, root / "nodes" / node, power_cap_w=cap)
        record = json.loads(path.read_text())
        n = NodeRun(agent=f"http://10.0.0.{i + 1}:9470", key=node, status="completed")
        n.identity = {"node": node, "rack": "r1", "gpus": 2, "gpu_model": "NVIDIA GB300", "simulated": True}
        n.view = {"run_id": "run1", "status": "completed", "started_at": 1000.0 + 0.1 * i, "ended_at": 1020.0}
        n.record = record
        n.files = {"record": f"nodes/{node}/run1.json", "requests": f"nodes/{node}/run1.requests.jsonl"}
        nodes.append(n)
    lost = NodeRun(agent="http://10.0.0.4:9470", key="n04", status="lost", error="agent stopped answering")
    lost.identity = {"node": "n04", "rack": "r1", "gpus": 2}
    nodes.append(lost)
    record = assemble_record(nodes, rack_run_id="rk1", run={"engine": "sim"}, agents=[n.agent for n in nodes],
                             bundle_root=root)
    write_json(root / "rack.json", record)


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report") / "bundle"
    asyncio.run(_make_bundle(root))
    return root


@pytest.fixture
def bundle(built_bundle: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so a test may break it."""
    return Path(shutil.copytree(built_bundle, tmp_path / "bundle"))


@pytest.mark.slow
def test_rack_report_writes_plots_and_markdown(bundle: Path, tmp_path: Path) -> None:
    record: dict[str, Any] = json.loads((bundle / "rack.json").read_text())
    s = record["summary"]
    assert [st["node"] for st in s["stragglers"]] == ["n03"]  # the power-capped node
    out = tmp_path / "report"
    files = write_report(bundle / "rack.json", out)
    assert [f.name for f in files] == [*PLOTS, "report.md"]
    for name in PLOTS:
        _png_ok(out / name)
    md = (out / "report.md").read_text()
    assert "SIMULATED" in md
    assert f"| rack output tokens/s | {s['output_tokens_per_s']:,.0f} |" in md
    spread = s["node_output_tokens_per_s"]
    assert f"{spread['min']:,.0f} / {spread['median']:,.0f} / {spread['mean']:,.0f} / {spread['max']:,.0f}" in md
    assert f"{s['output_tokens_per_j']:,.3f}" in md
    assert "| n03 |" in md
    assert "n03 (straggler)" in md
    assert "| n04 | lost | agent stopped answering |" in md
    assert "| nodes (completed / total) | 3 / 4 |" in md
    for name in PLOTS:
        assert f"]({name})" in md
    p99 = s["ttft_s"]["p99"] * 1e3
    assert f"{p99:,.1f}" in md


@pytest.mark.slow
def test_run_report_and_default_folder(bundle: Path) -> None:
    run = bundle / "nodes" / "n01" / "run1.json"
    rec = json.loads(run.read_text())
    res = subprocess.run([sys.executable, "-m", "rackscope", "report", str(run)], check=False, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = bundle / "nodes" / "n01" / "run1-report"
    assert res.stdout.split() == [str(out / n) for n in (*PLOTS, "report.md")]
    for name in PLOTS:
        _png_ok(out / name)
    md = (out / "report.md").read_text()
    assert f"| output tokens/s | {rec['summary']['output_tokens_per_s']:,.0f} |" in md
    assert f"| requests completed / failed | {rec['summary']['requests_completed']} / 0 |" in md


def test_report_notes_missing_pieces(bundle: Path, tmp_path: Path) -> None:
    run = bundle / "nodes" / "n02" / "run1.json"
    (bundle / "nodes" / "n02" / "run1.requests.jsonl").unlink()
    files = write_report(run, tmp_path / "r")
    assert "latency_cdf.png" not in [f.name for f in files]
    assert "run1.requests.jsonl not found" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("not json", "not valid JSON"),
        ('{"schema": "other/1"}', "is not one of"),
        ('{"schema": "rackscope.run/2"}', "not supported"),
        ('{"schema": "rackscope.run/1", "summary": {}}', "summary lacks"),
        ('{"schema": "rackscope.rack/1"}', "needs 'summary' and 'nodes'"),
    ],
)
def test_bad_or_missing_record_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    from rackscope.cli import main

    path = tmp_path / "rec.json"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("rackscope report: error:")
    assert not (tmp_path / "out").exists()


# --- sweeps ---------------------------------------------------------------------------------------
SWEEP_PLOTS = ("sweep_throughput.png", "sweep_latency_frontier.png", "sweep_tokens_per_joule.png")


def _sweep(folder: Path, name: str, gpu_model: str) -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "rackscope", "run", "--engine", "sim", "--gpu-model", gpu_model, "--gpus", "1",
         "--scenario", "sweep", "--sweep", "2,8,32", "--duration", "8", "--warmup", "0", "--virtual-clock",
         "--output", str(folder / name)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return folder / name


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow
def test_sweep_report_plots_against_load_and_a_row_per_point(tmp_path: Path) -> None:
    run = _sweep(tmp_path, "sweep.json", "gb300")
    files = write_report(run, tmp_path / "r")
    assert [f.name for f in files][-4:] == [*SWEEP_PLOTS, "report.md"]
    for name in SWEEP_PLOTS:
        width, height = _png_size(tmp_path / "r" / name)
        assert 1_000 <= width <= 1_400 and 450 <= height <= 650  # an 11 x 5 in figure at 110 dpi
        assert (tmp_path / "r" / name).stat().st_size > 20_000
    md = (tmp_path / "r" / "report.md").read_text()
    record = json.loads(run.read_text())
    rows = [line for line in md.splitlines() if line.startswith("| sweep | concurrency ")]
    assert [r.split(" | ")[1] for r in rows] == ["concurrency 2", "concurrency 8", "concurrency 32"]
    for row, p in zip(rows, record["points"], strict=True):
        cells = row.split(" | ")
        assert cells[2] == f"{p['summary']['output_tokens_per_s']:,.1f}"
        assert cells[5] == f"{p['summary']['ttft_s']['p99'] * 1e3:,.1f}"
    assert "| figures below are of point | concurrency 32 (no limits: highest output tokens/s) |" in md


@pytest.mark.slow
def test_two_records_on_one_chart(tmp_path: Path) -> None:
    before = _sweep(tmp_path, "h100.json", "h100")
    after = _sweep(tmp_path, "gb300.json", "gb300")
    res = subprocess.run([sys.executable, "-m", "rackscope", "report", str(before), str(after)], check=False,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "h100-vs-gb300-report"
    assert res.stdout.split() == [str(out / n) for n in (*SWEEP_PLOTS, "report.md")]
    for name in SWEEP_PLOTS:
        _png_size(out / name)
    md = (out / "report.md").read_text()
    assert [line.split(" | ")[0] for line in md.splitlines() if " | concurrency " in line] == (
        ["| h100"] * 3 + ["| gb300"] * 3)
    # The two lines differ: gb300 is faster than h100 at every concurrency.
    rates = {name: [p["summary"]["output_tokens_per_s"] for p in json.loads((tmp_path / f"{name}.json").read_text())
                    ["points"]] for name in ("h100", "gb300")}
    assert all(g > h for g, h in zip(rates["gb300"], rates["h100"], strict=True))
