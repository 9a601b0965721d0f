"""The demo's terminal view (rich) and the plain-text rack summary: rendered from plain state
objects, so they can be drawn (and tested) without a running rack."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

# The record this demo is modelled on: Azure ND GB300 v6, one GB300 NVL72 rack (18 x 4 GPUs),
# Llama2-70B, MLPerf Inference v5.1 Offline, Nov 2025.
REFERENCE_TOKENS_PER_S = 1_100_948.3
REFERENCE_LABEL = "GB300 NVL72 record (Azure ND GB300 v6, MLPerf v5.1 Offline)"
BAR_WIDTH = 36
BANNER = "SIMULATED RACK: no real GPU is measured; figures come from rackscope's GPU model"


@dataclass
class NodeLive:
    """One node as the view shows it."""

    node: str
    status: str = "waiting"  # waiting, pending, running, completed, failed, lost, ...
    tokens_per_s: float = 0.0
    power_w: float = 0.0
    gpu_power_w: list[float | None] = field(default_factory=list)  # None: GPU not answering
    gpu_limit_w: float = 1.0
    faults: list[str] = field(default_factory=list)


@dataclass
class RackLive:
    """The whole rack at one moment."""

    rack: str
    gpu_model: str
    nodes: list[NodeLive]
    elapsed_s: float = 0.0
    duration_s: float | None = None  # the measured window
    warmup_s: float = 0.0
    phase: str = "starting"  # starting, warming up, measuring, collecting, done
    tokens_per_j: float | None = None
    expected_tokens_per_s: float | None = None  # nodes x GPUs x the profile's per-GPU figure
    straggler_threshold: float = 0.95
    simulated: bool = True

    @property
    def tokens_per_s(self) -> float:
        return math.fsum(n.tokens_per_s for n in self.nodes)

    @property
    def power_w(self) -> float:
        return math.fsum(n.power_w for n in self.nodes)

    def median_tokens_per_s(self) -> float:
        rates = sorted(n.tokens_per_s for n in self.nodes if n.status == "running" or n.tokens_per_s > 0)
        if not rates:
            return 0.0
        mid = len(rates) // 2
        return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def final_state(last: RackLive, record: Mapping[str, Any]) -> RackLive:
    """The view's closing frame: the rack record's measured per-node figures on the last
    live frame (which keeps its per-GPU power and faults)."""
    by_node = {str(n.get("node")): n for n in record.get("nodes") or []}
    nodes = []
    for n in last.nodes:
        entry = by_node.get(n.node, {})
        rate, power = entry.get("output_tokens_per_s"), entry.get("power_w")
        nodes.append(NodeLive(
            node=n.node,
            status=str(entry.get("status") or n.status),
            tokens_per_s=float(rate) if isinstance(rate, int | float) else 0.0,
            power_w=float(power) if isinstance(power, int | float) else n.power_w,
            gpu_power_w=list(n.gpu_power_w),
            gpu_limit_w=n.gpu_limit_w,
            faults=list(n.faults),
        ))
    summary = record.get("summary") or {}
    tokens_per_j = summary.get("output_tokens_per_j")
    return RackLive(
        rack=last.rack,
        gpu_model=last.gpu_model,
        nodes=nodes,
        elapsed_s=float(summary.get("duration_s") or last.elapsed_s),
        duration_s=None,
        phase="done: measured",
        tokens_per_j=float(tokens_per_j) if isinstance(tokens_per_j, int | float) else last.tokens_per_j,
        expected_tokens_per_s=last.expected_tokens_per_s,
        straggler_threshold=float(summary.get("straggler_threshold") or last.straggler_threshold),
        simulated=last.simulated,
    )


# --- helpers ----------------------------------------------------------------------------------
def fmt_rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar with eighth-block resolution."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)


def heat_style(fraction: float | None) -> str:
    """Colour of a GPU by power draw against its limit: blue (idle) to red (at the limit)."""
    if fraction is None:
        return "bold white on red"
    f = min(1.0, max(0.0, fraction))
    stops = ((0.0, (40, 90, 200)), (0.5, (60, 180, 75)), (0.8, (240, 200, 40)), (1.0, (230, 50, 40)))
    for (f0, c0), (f1, c1) in itertools.pairwise(stops):
        if f <= f1:
            k = (f - f0) / (f1 - f0)
            r, g, b = (round(a + (bb - a) * k) for a, bb in zip(c0, c1, strict=True))
            return f"rgb({r},{g},{b})"
    return "rgb(230,50,40)"


# --- the live view ------------------------------------------------------------------------------
def render(state: RackLive) -> RenderableType:
    """One frame of the demo view."""
    parts: list[RenderableType] = []
    if state.simulated:
        parts.append(Text(f" {BANNER} ", style="bold black on yellow", justify="center"))
    rate = state.tokens_per_s
    head = Table.grid(padding=(0, 2))
    head.add_column(justify="right", style="bold")
    head.add_column()
    head.add_column(justify="right")
    progress = f"{state.elapsed_s:5.1f} s" + (
        f" of {state.warmup_s + state.duration_s:g} s ({state.warmup_s:g} s warm-up)" if state.duration_s else ""
    )
    head.add_row("rack", f"{state.rack}  {len(state.nodes)} nodes x {state.gpu_model}", f"{state.phase}  {progress}")
    head.add_row(
        "tokens/s",
        Text(bar(rate / REFERENCE_TOKENS_PER_S), style="bold green"),
        f"{fmt_rate(rate)}  ({rate / REFERENCE_TOKENS_PER_S:6.1%} of {REFERENCE_TOKENS_PER_S:,.0f})",
    )
    head.add_row("", Text(REFERENCE_LABEL, style="dim"), "")
    if state.expected_tokens_per_s:
        head.add_row(
            "profile",
            Text(bar(rate / state.expected_tokens_per_s), style="cyan"),
            f"{rate / state.expected_tokens_per_s:6.1%} of {fmt_rate(state.expected_tokens_per_s)} expected",
        )
    tpj = "-" if state.tokens_per_j is None else f"{state.tokens_per_j:.2f}"
    head.add_row("power", f"{state.power_w / 1000:,.1f} kW", f"{tpj} tokens/J")
    parts.append(head)

    median = state.median_tokens_per_s()
    fastest = max((n.tokens_per_s for n in state.nodes), default=0.0) or 1.0
    table = Table(expand=False, box=None, padding=(0, 1), header_style="bold")
    table.add_column("node")
    table.add_column("tokens/s", justify="right")
    table.add_column("", width=BAR_WIDTH)
    table.add_column("vs median", justify="right")
    table.add_column("kW", justify="right")
    table.add_column("GPU power")
    table.add_column("status")
    for n in state.nodes:
        share = n.tokens_per_s / median if median else None
        failed = n.status in ("failed", "lost", "unreachable", "rejected", "timeout", "cancelled")
        straggler = share is not None and n.tokens_per_s > 0 and share < state.straggler_threshold
        style = "bold red" if failed else ("bold yellow" if straggler else "green")
        heat = Text()
        for power in n.gpu_power_w or []:
            heat.append("■ ", style=heat_style(None if power is None else power / (n.gpu_limit_w or 1.0)))
        status = n.status + (" STRAGGLER" if straggler else "")
        if n.faults:
            status += "  [" + ", ".join(n.faults) + "]"
        table.add_row(
            Text(n.node, style=style),
            fmt_rate(n.tokens_per_s),
            Text(bar(n.tokens_per_s / fastest), style=style),
            "-" if share is None else f"{share:6.1%}",
            f"{n.power_w / 1000:.2f}",
            heat,
            Text(status, style=style if (failed or straggler) else "dim"),
        )
    parts.append(table)
    return Panel(Group(*parts), title="rackscope demo", border_style="yellow" if state.simulated else "blue")


# --- the final summary ---------------------------------------------------------------------------
def _f(value: Any, spec: str, unit: str = "") -> str:
    if not isinstance(value, int | float):
        return "-"
    return format(value, spec) + unit


def summary_text(record: Mapping[str, Any], *, bundle: str | None = None) -> str:
    """A rack record as a few lines of text (the end of ``rackscope demo`` and ``rack run``)."""
    s = record.get("summary") or {}
    spread = s.get("node_output_tokens_per_s") or {}
    lines = []
    if (record.get("environment") or {}).get("simulated"):
        lines.append(f"*** {BANNER} ***")
    lines.append(
        f"rack {record.get('rack') or '-'} run {record.get('rack_run_id')}: "
        f"{'complete' if s.get('complete') else 'INCOMPLETE'}, "
        f"{s.get('nodes_completed', 0)}/{s.get('nodes', 0)} nodes, {s.get('gpus', 0)} GPUs"
    )
    lines.append(
        f"  output tokens/s  {_f(s.get('output_tokens_per_s'), ',.0f')}"
        f"   ({_f(s.get('output_tokens_per_s_per_gpu'), ',.0f')} per GPU;"
        f" {_f((s.get('output_tokens_per_s') or 0) / REFERENCE_TOKENS_PER_S, '.1%')} of the "
        f"{REFERENCE_TOKENS_PER_S:,.0f} GB300 NVL72 record)"
    )
    lines.append(
        f"  per node         min {_f(spread.get('min'), ',.0f')} / median {_f(spread.get('median'), ',.0f')}"
        f" / mean {_f(spread.get('mean'), ',.0f')} / max {_f(spread.get('max'), ',.0f')}"
    )
    lines.append(
        f"  power            {_f((s.get('power_w') or 0) / 1000, ',.1f', ' kW')}"
        f"   energy {_f(s.get('energy_j'), ',.0f', ' J')}"
        f"   {_f(s.get('output_tokens_per_j'), '.2f', ' tokens/J')}"
    )
    stragglers: Sequence[Mapping[str, Any]] = s.get("stragglers") or []
    threshold = s.get("straggler_threshold", 0.95)
    if stragglers:
        lines.append(f"  stragglers (< {_f(threshold, '.0%')} of median):")
        for st in stragglers:
            lines.append(
                f"    {st['node']:<10} {_f(st['output_tokens_per_s'], ',.0f')} tokens/s"
                f"  {_f(st['fraction_of_median'], '.1%')} of median"
                f"  (short {_f(st['shortfall_tokens_per_s'], ',.0f')} tokens/s)"
            )
    else:
        lines.append(f"  stragglers       none below {_f(threshold, '.0%')} of the median")
    for failed in s.get("failed_nodes") or []:
        lines.append(f"  FAILED {failed['node']} ({failed['status']}): {failed.get('error') or ''}")
    if bundle:
        lines.append(f"  bundle           {bundle}")
    return "\n".join(lines)
