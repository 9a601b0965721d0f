"""Sweep plots of ``rackscope report``: a run's points (or one point per record given
several records) against the load: output tokens/s and tokens per joule against concurrency
(or rate), and the latency-throughput frontier (TTFT and TPOT p50/p99 against output
tokens/s) with the MLPerf server and interactive limits drawn and the points meeting them
marked. Several records go on the same charts, one line each (before/after)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.runner.config import PRESETS
from rackscope.runner.results.window import Limits

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_X_RATIO = 8.0  # loads spanning more than this factor read better on a log axis (8, 64, 512)
FRONTIER_PANELS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"))
PRESET_STYLES = {"server": ("dimgray", "--"), "interactive": ("black", ":")}


@dataclass(frozen=True)
class SweepPoint:
    """What the sweep plots need of one point (or of a whole run that is not a sweep)."""

    over: str | None  # "concurrency" or "rate"; None when the load is not known (offline)
    load: float | None
    tokens_per_s: float | None
    tokens_per_j: float | None
    latency_ms: Mapping[str, tuple[float | None, float | None]]  # key -> (p50, p99)
    complete: bool
    valid: bool | None  # against the record's own limits; None without limits

    def meets(self, limits: Limits) -> bool:
        """p99 TTFT and TPOT within ``limits`` (MLPerf judges at p99) on a complete point."""
        ttft, tpot = self.latency_ms["ttft_s"][1], self.latency_ms["tpot_s"][1]
        return (self.complete and ttft is not None and tpot is not None
                and ttft <= limits.ttft_s * 1e3 and tpot <= limits.tpot_s * 1e3)

    def judged(self, limits: Limits) -> bool | None:
        """``meets``, or None when the point has no p99 latency to judge (no request finished)."""
        if self.latency_ms["ttft_s"][1] is None or self.latency_ms["tpot_s"][1] is None:
            return None
        return self.meets(limits)

    @property
    def name(self) -> str:
        return "-" if self.over is None or self.load is None else f"{self.over} {self.load:g}"


@dataclass(frozen=True)
class SweepSeries:
    label: str
    points: list[SweepPoint]
    limits: Limits | None  # the record's own limits, when it has them


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _point(summary: Mapping[str, Any], over: str | None, load: float | None) -> SweepPoint:
    latency: dict[str, tuple[float | None, float | None]] = {}
    for key, _ in FRONTIER_PANELS:
        d = summary.get(key) if isinstance(summary.get(key), Mapping) else {}
        assert isinstance(d, Mapping)
        p50, p99 = _num(d.get("p50")), _num(d.get("p99"))
        latency[key] = (None if p50 is None else p50 * 1e3, None if p99 is None else p99 * 1e3)
    valid = summary.get("valid")
    return SweepPoint(over, load, _num(summary.get("output_tokens_per_s")), _num(summary.get("output_tokens_per_j")),
                      latency, bool(summary.get("complete")), valid if isinstance(valid, bool) else None)


def series_of(label: str, record: Mapping[str, Any]) -> SweepSeries:
    """A record's points: a sweep's own, or the whole run as one point at its concurrency or
    rate (so a single run can stand beside a sweep on the same chart)."""
    points: list[SweepPoint] = []
    summaries: list[Mapping[str, Any]] = []
    for entry in record.get("points") or []:
        if not (isinstance(entry, Mapping) and isinstance(entry.get("point"), Mapping)
                and isinstance(entry.get("summary"), Mapping)):
            continue
        over, load = next(iter(entry["point"].items()), (None, None))
        points.append(_point(entry["summary"], None if over is None else str(over), _num(load)))
        summaries.append(entry["summary"])
    if not points:
        config = record.get("config") or {}
        scenario = config.get("scenario")
        over = "concurrency" if scenario == "concurrency" else "rate" if scenario == "server" else None
        summary = record.get("summary") or {}
        points.append(_point(summary, over, _num(config.get(over)) if over else None))
        summaries.append(summary)
    first = summaries[0]
    ttft, tpot = _num(first.get("ttft_limit_s")), _num(first.get("tpot_limit_s"))
    limits = Limits(ttft, tpot) if ttft is not None and tpot is not None else None
    return SweepSeries(label, points, limits)


def is_sweep(record: Mapping[str, Any]) -> bool:
    return bool(record.get("points"))


# --- plots ---------------------------------------------------------------------------------------
def _axes_over(series: Sequence[SweepSeries]) -> str:
    overs = sorted({p.over for s in series for p in s.points if p.over is not None and p.load is not None})
    return " / ".join(overs) if overs else "load"


def _load_axis(ax: Any, loads: Sequence[float], label: str) -> None:
    positive = [v for v in loads if v > 0]
    if positive and max(positive) / min(positive) > LOG_X_RATIO:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(positive)))
        ax.set_xticklabels([f"{v:g}" for v in sorted(set(positive))])
        ax.minorticks_off()
    ax.set_xlabel(label)


def _against_load(series: Sequence[SweepSeries], value: Callable[[SweepPoint], float | None], ylabel: str,
                  title: str, figure: Callable[[], Figure], colors: list[Any]) -> Figure | None:
    lines = []
    for s in series:
        pairs = [(p.load, value(p)) for p in s.points if p.load is not None and value(p) is not None]
        if pairs:
            lines.append((s, pairs))
    if not lines:
        return None
    fig = figure()
    ax = fig.add_subplot()
    loads: list[float] = []
    for (s, pairs), color in zip(lines, colors, strict=False):
        xs = [float(x) for x, _ in pairs if x is not None]
        ys = [float(y) for _, y in pairs if y is not None]
        loads += xs
        ax.plot(xs, ys, marker="o", color=color, label=s.label)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:,.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    _load_axis(ax, loads, _axes_over(series))
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig


def throughput_figure(series: Sequence[SweepSeries], figure: Callable[[], Figure], colors: list[Any],
                      suffix: str = "") -> Figure | None:
    return _against_load(series, lambda p: p.tokens_per_s, "output tokens/s",
                         f"Output throughput against load{suffix}", figure, colors)


def tokens_per_joule_figure(series: Sequence[SweepSeries], figure: Callable[[], Figure], colors: list[Any],
                            suffix: str = "") -> Figure | None:
    return _against_load(series, lambda p: p.tokens_per_j, "output tokens per joule",
                         f"Energy efficiency against load{suffix}", figure, colors)


def frontier_figure(series: Sequence[SweepSeries], figure: Callable[[], Figure], colors: list[Any],
                    suffix: str = "") -> Figure | None:
    """TTFT and TPOT p50 (solid) and p99 (dashed) against output tokens/s. Each point's p99
    marker says which MLPerf limits it meets: a star both presets (interactive is the tighter),
    a filled circle server only, a cross neither."""
    if not any(p.tokens_per_s is not None and p.latency_ms["ttft_s"][1] is not None for s in series for p in s.points):
        return None
    fig = figure()
    axes = fig.subplots(1, len(FRONTIER_PANELS))
    for ax, (key, title) in zip(axes, FRONTIER_PANELS, strict=True):
        for s, color in zip(series, colors, strict=False):
            pts = sorted((p for p in s.points if p.tokens_per_s is not None), key=lambda p: p.tokens_per_s or 0.0)
            for q, style in ((0, "-"), (1, "--")):
                xy = [(p.tokens_per_s, p.latency_ms[key][q]) for p in pts if p.latency_ms[key][q] is not None]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], linestyle=style, color=color, alpha=0.8,
                            label=f"{s.label} p{50 if q == 0 else 99}")
            for p in pts:
                y = p.latency_ms[key][1]
                if y is None:
                    continue
                marker, size = ("*", 160) if p.meets(PRESETS["interactive"]) else (
                    ("o", 50) if p.meets(PRESETS["server"]) else ("x", 50))
                ax.scatter([p.tokens_per_s], [y], marker=marker, s=size, color=color, zorder=3,
                           edgecolors="black" if marker != "x" else None, linewidths=0.6)
                ax.annotate(p.name, (p.tokens_per_s or 0.0, y), textcoords="offset points", xytext=(5, -10),
                            fontsize="x-small")
        for name, limits in PRESETS.items():
            color, style = PRESET_STYLES.get(name, ("grey", "-."))
            limit_ms = (limits.ttft_s if key == "ttft_s" else limits.tpot_s) * 1e3
            ax.axhline(limit_ms, color=color, linestyle=style, linewidth=1, label=f"MLPerf {name} p99 limit")
        own = {s.limits for s in series if s.limits is not None} - set(PRESETS.values())
        for limits in own:
            limit_ms = (limits.ttft_s if key == "ttft_s" else limits.tpot_s) * 1e3
            ax.axhline(limit_ms, color="black", linestyle="-.", linewidth=1, label=f"run's p99 limit {limit_ms:g} ms")
        ax.set_yscale("log")
        ax.set_title(f"{title} against throughput")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", loc="upper left")
    fig.suptitle("Latency-throughput frontier (p99 marker: * meets MLPerf interactive, "
                 "o server only, x neither)" + suffix, fontsize="medium")
    return fig


# --- markdown ------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def markdown_rows(series: Sequence[SweepSeries]) -> list[str]:
    """A table row per point of every record."""
    lines = [
        "| record | point | output tokens/s | tokens/J | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
        "| meets run's limits | MLPerf server | MLPerf interactive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in series:
        for p in s.points:
            tps = "-" if p.tokens_per_s is None else f"{p.tokens_per_s:,.1f}"
            tpj = "-" if p.tokens_per_j is None or math.isnan(p.tokens_per_j) else f"{p.tokens_per_j:,.3f}"
            lines.append(
                f"| {s.label} | {p.name} | {tps} | {tpj} | {_ms(p.latency_ms['ttft_s'][0])} | "
                f"{_ms(p.latency_ms['ttft_s'][1])} | {_ms(p.latency_ms['tpot_s'][0])} | "
                f"{_ms(p.latency_ms['tpot_s'][1])} | {_yes(p.valid)} | {_yes(p.judged(PRESETS['server']))} | "
                f"{_yes(p.judged(PRESETS['interactive']))} |"
            )
    return lines


SWEEP_PLOTS = (
    ("sweep_throughput", "sweep_throughput.png", "Output tokens/s against load", throughput_figure),
    ("sweep_frontier", "sweep_latency_frontier.png", "Latency-throughput frontier", frontier_figure),
    ("sweep_tokens_per_joule", "sweep_tokens_per_joule.png", "Tokens per joule against load",
     tokens_per_joule_figure),
)


def label_for(path: Path, record: Mapping[str, Any], others: Sequence[Path]) -> str:
    """The legend name of a record: its file name, unless two records share one."""
    name = path.name.removesuffix(".json")
    if sum(1 for o in others if o.name == path.name) > 1:
        name = f"{name} ({record.get('run_id')})"
    return name


def write_plots(series: Sequence[SweepSeries], out: Path, figure: Callable[[], Figure],
                save: Callable[[Figure, Path], None], colors: list[Any], suffix: str = "") -> dict[str, str]:
    """Draw the sweep charts that have data into ``out``; their keys and file names."""
    images: dict[str, str] = {}
    for key, name, _, draw in SWEEP_PLOTS:
        fig = draw(series, figure, colors, suffix)
        if fig is not None:
            save(fig, out / name)
            images[key] = name
    return images


TITLES = {key: title for key, _, title, _ in SWEEP_PLOTS}


def headline_row(record: Mapping[str, Any]) -> str | None:
    """Which point a sweep's top-level figures are (see docs/results-schema.md)."""
    chosen = (record.get("summary") or {}).get("sweep")
    if not isinstance(chosen, Mapping):
        return None
    point = chosen.get("point") if isinstance(chosen.get("point"), Mapping) else {}
    assert isinstance(point, Mapping)
    name = ", ".join(f"{k} {v:g}" if isinstance(v, int | float) else f"{k} {v}" for k, v in point.items())
    how = {"meets_limits": "highest output tokens/s meeting the limits",
           "no_point_meets_limits": "no point meets the limits: highest output tokens/s",
           "no_limits": "no limits: highest output tokens/s"}.get(str(chosen.get("chosen_by")), "?")
    return f"| figures below are of point | {name or '-'} ({how}) |"


def markdown_several(paths: Sequence[Path], records: Sequence[Mapping[str, Any]],
                     series: Sequence[SweepSeries], images: Mapping[str, str]) -> str:
    """report.md for several records on one chart."""
    lines = ["# Runs compared", ""]
    if any((r.get("environment") or {}).get("simulated") for r in records):
        lines += ["> **SIMULATED**: some of these figures come from rackscope's simulated GPUs.", ""]
    lines += ["| record | run | scenario | engine | model |", "|---|---|---|---|---|"]
    for path, r in zip(paths, records, strict=True):
        config = r.get("config") or {}
        lines.append(f"| `{path.name}` | {r.get('run_id')} | {config.get('scenario', '-')} | "
                     f"{config.get('engine', '-')} | {config.get('model', '-')} |")
    lines += ["", "## Points", "", *markdown_rows(series), "", "## Plots", ""]
    for key, file in images.items():
        lines += [f"### {TITLES.get(key, key)}", "", f"![{TITLES.get(key, key)}]({file})", ""]
    if not images:
        lines += ["No record has a known load or throughput to plot.", ""]
    return "\n".join(lines)
