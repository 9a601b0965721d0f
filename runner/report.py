"""``rackscope report``: PNG plots (matplotlib, Agg) and a Markdown summary from a run record
(``rackscope.run/1``) or a rack record (``rackscope.rack/1``, read with its bundle).

Plots: output tokens/s over time per node (and the rack total), latency CDFs (TTFT,
TPOT/ITL, end-to-end) from the per-request JSONL, power against throughput per 1 s bucket,
and tokens per joule per node (per GPU for a single-node run); for sweeps, and for several
records on one chart, the load plots of ``runner.report_sweep``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ResultError
from rackscope.fileio import atomic_writer
from rackscope.jsontypes import JsonDict
from rackscope.runner import report_sweep
from rackscope.runner.results.io import check_schema, load_json, load_requests, load_run
from rackscope.runner.results.stats import percentile
from rackscope.runner.server_view import describe as describe_server

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUN_FAMILY = "rackscope.run"
RACK_FAMILY = "rackscope.rack"
CDF_MAX_POINTS = 2_000  # a CDF line needs no more points than a figure has pixels
LEGEND_MAX_ENTRIES = 24
LATENCY_PANELS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT / ITL"), ("e2e_s", "end-to-end latency"))
PNG_DPI = 110


@dataclass
class NodeData:
    """What the plots need of one node."""

    name: str
    offset_s: float = 0.0  # its window's start after the earliest node's
    timeseries: Mapping[str, Any] | None = None
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k, _ in LATENCY_PANELS})
    itl_s: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    power_w: float | None = None
    tokens_per_j: float | None = None
    status: str = "completed"
    straggler: bool = False


@dataclass
class ReportInput:
    kind: str  # "run" or "rack"
    path: Path
    record: JsonDict
    nodes: list[NodeData]
    per_gpu: list[JsonDict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------------
def _read_latencies(path: Path, node: NodeData) -> None:
    for row in load_requests(path):
        if not row.get("ok"):
            continue
        for key, _ in LATENCY_PANELS:
            value = row.get(key)
            if isinstance(value, int | float):
                node.latencies[key].append(float(value))
        itl = row.get("itl_mean_s")
        if isinstance(itl, int | float):
            node.itl_s.append(float(itl))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def load_input(path: str | Path) -> ReportInput:
    """Read a run or rack record and whatever of its bundle is there; missing pieces become
    notes in the report, a missing or malformed record is a ``ResultError``."""
    path = Path(path)
    obj = load_json(path)
    schema = check_schema(path, obj, families=(RUN_FAMILY, RACK_FAMILY))
    if schema.startswith(RUN_FAMILY + "/"):
        return _load_run(path)
    return _load_rack(path, obj)


def _load_run(path: Path) -> ReportInput:
    record = load_run(path)
    summary = record["summary"]
    name = str((record.get("config") or {}).get("node") or record.get("run_id") or "run")
    node = NodeData(
        name=name,
        timeseries=record.get("timeseries") if isinstance(record.get("timeseries"), dict) else None,
        tokens_per_s=_num(summary.get("output_tokens_per_s")),
        power_w=_num(summary.get("average_power_w")),
        tokens_per_j=_num(summary.get("output_tokens_per_j")),
        status="completed" if summary.get("complete") else "incomplete",
    )
    out = ReportInput("run", path, record, [node], per_gpu=list(record.get("per_gpu") or []))
    requests_file = record.get("requests_file")
    if isinstance(requests_file, str) and requests_file:
        rows = path.parent / Path(requests_file).name
        if rows.exists():
            _read_latencies(rows, node)
        else:
            out.notes.append(f"per-request file {rows.name} not found: no latency CDFs")
    else:
        out.notes.append("the record names no per-request file: no latency CDFs")
    return out


def _load_rack(path: Path, record: JsonDict) -> ReportInput:
    if not isinstance(record.get("summary"), dict) or not isinstance(record.get("nodes"), list):
        raise ResultError(f"{path}: a rack record needs 'summary' and 'nodes'")
    out = ReportInput("rack", path, record, [])
    starts = [n.get("started_at") for n in record["nodes"] if isinstance(n, dict)]
    origin = min((s for s in starts if isinstance(s, int | float)), default=0.0)
    for entry in record["nodes"]:
        if not isinstance(entry, dict):
            raise ResultError(f"{path}: 'nodes' entries must be objects")
        node = NodeData(
            name=str(entry.get("node") or entry.get("key") or "?"),
            offset_s=(entry["started_at"] - origin) if isinstance(entry.get("started_at"), int | float) else 0.0,
            tokens_per_s=_num(entry.get("output_tokens_per_s")),
            power_w=_num(entry.get("power_w")),
            tokens_per_j=_num(entry.get("output_tokens_per_j")),
            status=str(entry.get("status") or "?"),
            straggler=bool(entry.get("straggler")),
        )
        out.nodes.append(node)
        files = entry.get("files") or {}
        record_file = files.get("record")
        if isinstance(record_file, str):
            try:
                node_record = load_run(path.parent / record_file)
            except ResultError as exc:
                out.notes.append(f"{node.name}: record unreadable ({exc})")
            else:
                ts = node_record.get("timeseries")
                node.timeseries = ts if isinstance(ts, dict) else None
        elif node.status == "completed":
            out.notes.append(f"{node.name}: no record in the bundle")
        requests_file = files.get("requests")
        if isinstance(requests_file, str):
            try:
                _read_latencies(path.parent / requests_file, node)
            except ResultError as exc:
                out.notes.append(f"{node.name}: per-request rows unreadable ({exc})")
    return out


# --- plotting ------------------------------------------------------------------------------------
def _figure(width: float = 9.0, height: float = 5.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    try:
        with atomic_writer(path) as handle:
            fig.savefig(handle, format="png", dpi=PNG_DPI)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if count > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(count)]


def _legend(ax: Any, count: int) -> None:
    if count <= LEGEND_MAX_ENTRIES:
        ax.legend(fontsize="small", ncol=max(1, math.ceil(count / 12)), loc="best")


def _steps(ts: Mapping[str, Any], key: str, offset_s: float = 0.0) -> tuple[list[float], list[float]]:
    """Bucket series as step coordinates, the last bucket drawn to its end."""
    values = [float(v) for v in ts[key]]
    bucket_s = float(ts.get("bucket_s") or 1.0)
    starts = [offset_s + float(t) for t in ts.get("t_s") or [i * bucket_s for i in range(len(values))]]
    return [*starts, starts[-1] + bucket_s], [*values, values[-1]]


def plot_throughput(data: ReportInput, path: Path) -> bool:
    series = [(n, n.timeseries) for n in data.nodes if n.timeseries and n.timeseries.get("output_tokens_per_s")]
    if not series:
        data.notes.append("no throughput time series in the record(s)")
        return False
    rack_ts = data.record.get("timeseries") if data.kind == "rack" else None
    show_rack = isinstance(rack_ts, dict) and bool(rack_ts.get("output_tokens_per_s"))
    fig = _figure(9.0, 7.0 if show_rack else 5.0)
    if show_rack:
        top, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
        assert isinstance(rack_ts, dict)
        x, y = _steps(rack_ts, "output_tokens_per_s")
        top.step(x, y, where="post", color="black", linewidth=2.0)
        top.set_ylabel("rack tokens/s")
        top.set_ylim(bottom=0)
        top.grid(alpha=0.3)
        top.set_title(f"Rack output throughput ({rack_ts.get('nodes', len(series))} nodes summed)"
                      + (" (SIMULATED)" if _simulated(data) else ""))
    else:
        ax = fig.add_subplot()
        ax.set_title("Output throughput over time" + (" (SIMULATED)" if _simulated(data) else ""))
    for (node, ts), color in zip(series, _colors(len(series)), strict=True):
        assert ts is not None
        x, y = _steps(ts, "output_tokens_per_s", node.offset_s)
        style = {"linewidth": 2.0, "linestyle": "--"} if node.straggler else {"linewidth": 1.0}
        ax.step(x, y, where="post", color=color, label=node.name + (" (straggler)" if node.straggler else ""), **style)
    ax.set_xlabel("time since the first node started (s)")
    ax.set_ylabel("output tokens/s per node")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    _save(fig, path)
    return True


def _cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    if n <= CDF_MAX_POINTS:
        return ordered, [(i + 1) / n for i in range(n)]
    qs = [i / (CDF_MAX_POINTS - 1) for i in range(CDF_MAX_POINTS)]
    return [percentile(ordered, q * 100.0) for q in qs], qs


def plot_latency(data: ReportInput, path: Path) -> bool:
    pools = {key: [v for n in data.nodes for v in n.latencies[key]] for key, _ in LATENCY_PANELS}
    itl = [v for n in data.nodes for v in n.itl_s]
    if not any(pools.values()):
        data.notes.append(
            "no request finished inside the measured window, so there are no latency CDFs "
            "(a window shorter than a request's generation time finishes none)"
        )
        return False
    fig = _figure(12.0, 4.2)
    axes = fig.subplots(1, len(LATENCY_PANELS))
    for ax, (key, title) in zip(axes, LATENCY_PANELS, strict=True):
        values = pools[key]
        if values:
            x, y = _cdf_points(values)
            ax.step([v * 1e3 for v in x], y, where="post", label=f"{key.removesuffix('_s')} (n={len(values):,})")
            p99 = percentile(sorted(values), 99.0)
            ax.axvline(p99 * 1e3, color="grey", linestyle=":", linewidth=1)
            ax.text(p99 * 1e3, 0.5, f" p99\n {p99 * 1e3:,.1f} ms", fontsize="small", color="grey")
        if key == "tpot_s" and itl:
            x, y = _cdf_points(itl)
            ax.step([v * 1e3 for v in x], y, where="post", label=f"ITL, per-request mean (n={len(itl):,})")
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    axes[0].set_ylabel("fraction of requests")
    _save(fig, path)
    return True


def plot_power(data: ReportInput, path: Path) -> bool:
    points = []
    for node in data.nodes:
        ts = node.timeseries
        if not ts or not ts.get("power_w") or not ts.get("output_tokens_per_s"):
            continue
        pairs = list(zip(ts["power_w"], ts["output_tokens_per_s"], strict=False))
        points.append((node, [p for p, _ in pairs], [r for _, r in pairs]))
    averages = [(n, n.power_w, n.tokens_per_s) for n in data.nodes if n.power_w is not None and n.tokens_per_s]
    if not points and not averages:
        data.notes.append("no power readings: no power-throughput plot")
        return False
    fig = _figure()
    ax = fig.add_subplot()
    colors = _colors(max(len(data.nodes), 1))
    index = {n.name: i for i, n in enumerate(data.nodes)}
    for node, power, rate in points:
        ax.scatter(power, rate, s=10, alpha=0.45, color=colors[index[node.name]], label=f"{node.name} (1 s buckets)"
                   if len(points) <= 4 else None)
    for node, avg_power, avg_rate in averages:
        ax.scatter([avg_power], [avg_rate], s=110 if node.straggler else 70, marker="X" if node.straggler else "D",
                   edgecolor="black", color=colors[index[node.name]], zorder=3)
        if len(averages) <= LEGEND_MAX_ENTRIES:
            ax.annotate(node.name, (avg_power, avg_rate), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xlabel("node power (W)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Power against throughput (run averages: diamonds, stragglers: X)")
    ax.grid(alpha=0.3)
    if len(points) <= 4 and points:
        ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_tokens_per_joule(data: ReportInput, path: Path) -> bool:
    bars: list[tuple[str, float, bool]] = []
    label = "node"
    if data.kind == "run" and len(data.per_gpu) > 1 and all(g.get("tokens_attributed") for g in data.per_gpu):
        label = "GPU"
        bars = [(str(g.get("gpu")), float(g["output_tokens_per_j"]), False)
                for g in data.per_gpu if isinstance(g.get("output_tokens_per_j"), int | float)]
    if not bars:
        label = "node"
        bars = [(n.name, n.tokens_per_j, n.straggler) for n in data.nodes if n.tokens_per_j is not None]
    if not bars:
        data.notes.append("no energy readings: no tokens/J plot")
        return False
    fig = _figure(max(6.0, 0.45 * len(bars) + 3.0), 4.5)
    ax = fig.add_subplot()
    names = [b[0] for b in bars]
    values = [b[1] for b in bars]
    ax.bar(names, values, color=["#d62728" if b[2] else "#2ca02c" for b in bars])
    mean = math.fsum(values) / len(values)
    ax.axhline(mean, color="black", linestyle=":", linewidth=1, label=f"mean {mean:.2f}")
    ax.set_ylabel("output tokens per joule")
    ax.set_xlabel(label)
    ax.set_title(f"Energy efficiency per {label}" + (" (red: throughput straggler)" if any(b[2] for b in bars) else ""))
    ax.tick_params(axis="x", labelrotation=60 if len(bars) > 8 else 0, labelsize="small")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def _simulated(data: ReportInput) -> bool:
    return bool((data.record.get("environment") or {}).get("simulated"))


# --- markdown -------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return format(value, spec) + unit


def _latency_rows(data: ReportInput) -> list[str]:
    rows = []
    for key, title in LATENCY_PANELS:
        values = sorted(v for n in data.nodes for v in n.latencies[key])
        if not values:
            continue
        rows.append(
            f"| {title} | {len(values):,} | {percentile(values, 50) * 1e3:,.1f} | "
            f"{percentile(values, 90) * 1e3:,.1f} | {percentile(values, 99) * 1e3:,.1f} | {values[-1] * 1e3:,.1f} |"
        )
    return rows


def markdown(data: ReportInput, images: Mapping[str, str]) -> str:
    r = data.record
    s = r.get("summary") or {}
    lines: list[str] = []
    if data.kind == "rack":
        lines.append(f"# Rack run {r.get('rack_run_id')} ({r.get('rack') or 'rack'})")
    else:
        lines.append(f"# Run {r.get('run_id')}")
    lines.append("")
    if _simulated(data):
        lines += ["> **SIMULATED**: these figures come from rackscope's simulated GPUs, not hardware.", ""]
    lines.append(f"Source: `{data.path.name}` ({r.get('schema')})")
    lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    lines.append(f"| complete | {'yes' if s.get('complete') else 'no'} |")
    if data.kind == "rack":
        spread = s.get("node_output_tokens_per_s") or {}
        lines.append(f"| nodes (completed / total) | {s.get('nodes_completed', 0)} / {s.get('nodes', 0)} |")
        lines.append(f"| GPUs | {s.get('gpus', 0)} |")
        lines.append(f"| rack output tokens/s | {_fmt(s.get('output_tokens_per_s'))} |")
        lines.append(f"| output tokens/s per GPU | {_fmt(s.get('output_tokens_per_s_per_gpu'))} |")
        lines.append(
            f"| per node min / median / mean / max | {_fmt(spread.get('min'))} / {_fmt(spread.get('median'))} / "
            f"{_fmt(spread.get('mean'))} / {_fmt(spread.get('max'))} |"
        )
        lines.append(f"| rack power | {_fmt((s.get('power_w') or 0) / 1000, ',.2f', ' kW')} |")
    else:
        lines.append(f"| scenario | {(r.get('config') or {}).get('scenario', '-')} |")
        headline = report_sweep.headline_row(r)
        if headline:
            lines.append(headline)
        lines.append(f"| output tokens/s | {_fmt(s.get('output_tokens_per_s'))} |")
        lines.append(f"| output tokens/s per GPU | {_fmt(s.get('output_tokens_per_s_per_gpu'))} |")
        lines.append(
            f"| requests completed / failed | {s.get('requests_completed', 0)} / {s.get('requests_failed', 0)} |"
        )
        lines.append(f"| average power | {_fmt(s.get('average_power_w'), ',.0f', ' W')} |")
    lines.append(f"| duration | {_fmt(s.get('duration_s'), ',.1f', ' s')} |")
    lines.append(f"| energy | {_fmt(s.get('energy_j'), ',.0f', ' J')} |")
    lines.append(f"| output tokens per joule | {_fmt(s.get('output_tokens_per_j'), ',.3f')} |")
    if "validity" in s:
        lines.append(f"| validity | {s['validity']} |")
    lines.append("")
    if data.kind == "rack":
        stragglers = s.get("stragglers") or []
        threshold = s.get("straggler_threshold", 0.95)
        lines.append(f"## Stragglers (below {_fmt(threshold * 100, '.0f')} % of the median node)")
        lines.append("")
        if stragglers:
            lines += ["| node | tokens/s | of median | shortfall tokens/s |", "|---|---|---|---|"]
            for st in stragglers:
                lines.append(f"| {st['node']} | {_fmt(st['output_tokens_per_s'])} | "
                             f"{_fmt(st['fraction_of_median'] * 100, '.1f', ' %')} | "
                             f"{_fmt(st['shortfall_tokens_per_s'])} |")
        else:
            lines.append("None.")
        lines.append("")
        failed = s.get("failed_nodes") or []
        if failed:
            lines += ["## Failed nodes", "", "| node | status | error |", "|---|---|---|"]
            lines += [f"| {f['node']} | {f['status']} | {(f.get('error') or '').replace('|', '/')} |" for f in failed]
            lines.append("")
        lines += ["## Nodes", "", "| node | status | tokens/s | power W | tokens/J |", "|---|---|---|---|---|"]
        for n in data.nodes:
            lines.append(f"| {n.name}{' (straggler)' if n.straggler else ''} | {n.status} | {_fmt(n.tokens_per_s)} | "
                         f"{_fmt(n.power_w)} | {_fmt(n.tokens_per_j, ',.3f')} |")
        lines.append("")
    if data.kind == "run" and r.get("server") is not None:
        # The inference server's own count of the run beside the client's (runner.server_view).
        lines += ["## Server view (the inference server's metrics page)", ""]
        lines += [f"- {line}" for line in describe_server(r.get("server"))]
        lines.append("")
    if data.kind == "run" and report_sweep.is_sweep(r):
        series = [report_sweep.series_of(data.path.name.removesuffix(".json"), r)]
        lines += ["## Sweep points", "", *report_sweep.markdown_rows(series), ""]
    latency = _latency_rows(data)
    if latency:
        lines += ["## Latency (ms)", "", "| | requests | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
        lines += [*latency, ""]
    lines.append("## Plots")
    lines.append("")
    titles = {
        "throughput": "Output tokens/s over time", "latency": "Latency CDFs",
        "power": "Power against throughput", "tokens_per_joule": "Tokens per joule", **report_sweep.TITLES,
    }
    for key, file in images.items():
        lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({file})", ""]
    if data.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in data.notes), ""]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------------------
PLOTS = (
    ("throughput", "throughput.png", plot_throughput),
    ("latency", "latency_cdf.png", plot_latency),
    ("power", "power_vs_throughput.png", plot_power),
    ("tokens_per_joule", "tokens_per_joule.png", plot_tokens_per_joule),
)


def write_report(record_paths: str | Path | Sequence[str | Path], output_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs and ``report.md``; returns the files written (Markdown last). Several
    run records go on the same sweep charts, one line each."""
    paths = [Path(record_paths)] if isinstance(record_paths, str | Path) else [Path(p) for p in record_paths]
    if not paths:
        raise ResultError("no record to report on")
    try:
        import matplotlib
    except ImportError as exc:
        # Plots belong to the operator's machine: the node agent's core install leaves them out.
        raise ResultError("rackscope report draws with matplotlib: pip install 'rackscope[plots]'") from exc

    matplotlib.use("Agg")
    if len(paths) > 1:
        return _write_several(paths, output_dir)
    data = load_input(paths[0])
    out = _output_dir(paths, output_dir)
    written: list[Path] = []
    images: dict[str, str] = {}
    for key, name, plot in PLOTS:
        if plot(data, out / name):
            images[key] = name
            written.append(out / name)
    if data.kind == "run" and report_sweep.is_sweep(data.record):
        series = [report_sweep.series_of(paths[0].name.removesuffix(".json"), data.record)]
        sweep_images = report_sweep.write_plots(series, out, _figure_wide, _save, _colors(1),
                                                " (SIMULATED)" if _simulated(data) else "")
        images.update(sweep_images)
        written += [out / name for name in sweep_images.values()]
    return [*written, _write_md(out / "report.md", markdown(data, images))]


def _write_several(paths: Sequence[Path], output_dir: str | Path | None) -> list[Path]:
    records = [load_run(p) for p in paths]  # before/after charts compare run records
    series = [report_sweep.series_of(report_sweep.label_for(p, r, paths), r)
              for p, r in zip(paths, records, strict=True)]
    out = _output_dir(paths, output_dir)
    simulated = any((r.get("environment") or {}).get("simulated") for r in records)
    images = report_sweep.write_plots(series, out, _figure_wide, _save, _colors(len(series)),
                                      " (SIMULATED)" if simulated else "")
    md = report_sweep.markdown_several(paths, records, series, images)
    return [*(out / name for name in images.values()), _write_md(out / "report.md", md)]


def _figure_wide() -> Figure:
    return _figure(11.0, 5.0)


def _output_dir(paths: Sequence[Path], output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        out = Path(output_dir)
    elif len(paths) == 1:
        out = default_output(paths[0])
    else:
        out = paths[0].parent / ("-vs-".join(p.name.removesuffix(".json") for p in paths[:3]) + "-report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultError(f"cannot create {out}: {exc.strerror or exc}") from exc
    return out


def _write_md(md: Path, text: str) -> Path:
    try:
        with atomic_writer(md) as handle:
            handle.write(text.encode())
    except OSError as exc:
        raise ResultError(f"cannot write {md}: {exc.strerror or exc}") from exc
    return md


def default_output(record_path: Path) -> Path:
    stem = record_path.name.removesuffix(".json")
    return record_path.parent / f"{stem}-report"
