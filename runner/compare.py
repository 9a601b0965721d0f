"""Comparing run or rack records: each metric's change, its confidence interval and a noise-aware verdict.

The metric list is data. Each entry names a key of the records' ``summary`` (dotted for nested
values such as ``ttft_s.p99``) and which direction is better; the judged ones also say how
their interval is estimated (``Estimate``): output tokens/s and tokens per joule from the 1 s
buckets of ``timeseries``, TTFT and TPOT percentiles from the per-request rows (see
``runner.verdict`` for the method). Flags (``valid``, ``complete``) regress when they turn
false; the remaining metrics are shown for information. A judged metric whose records carry
no buckets or rows (trtllm-bench, records from elsewhere) falls back to its point values
against the threshold, and says so.

Each side is one or more records of the same kind: run records (``rackscope.run/1``) or rack
records (``rackscope.rack/1``, compared as a whole and node by node through the node records
in their bundles).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rackscope.errors import ConfigError, ResultError
from rackscope.jsontypes import JsonDict
from rackscope.runner.measured import Measured, Window, load_comparable, measure
from rackscope.runner.verdict import (
    DEFAULT_CONFIDENCE_PCT,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    EXIT_USAGE,
    MIN_TAIL,
    Interval,
    QuantileSampler,
    RateSampler,
    change_interval,
    decide,
    exit_code,
)

Better = Literal["higher", "lower", "info"]
Basis = Literal["bootstrap", "point", "flag", "info", ""]


@dataclass(frozen=True, slots=True)
class Estimate:
    """How a judged metric's interval is estimated: from the 1 s buckets (``rate``: output
    tokens/s, ``efficiency``: tokens per joule) or from a per-request row field's quantile."""

    source: Literal["rate", "efficiency", "rows"]
    row_field: str = ""
    quantile: float = 0.0


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # dotted path inside a summary
    label: str
    better: Better
    scale: float = 1.0  # display multiplier (seconds shown as ms)
    digits: int = 1
    estimate: Estimate | None = None  # judged with an interval; None: a flag or information


RATE = Estimate("rate")
EFFICIENCY = Estimate("efficiency")
JUDGED_PERCENTILES = ("p50", "p99")


def _latency(name: str, key: str, judged: bool = False) -> tuple[Metric, ...]:
    """p50, p90, p99 of a latency; with ``judged``, the JUDGED_PERCENTILES get an interval
    from the per-request rows' ``key`` field and the others are shown for information."""
    out = []
    for p, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0)):
        estimate = Estimate("rows", key, q / 100.0) if judged and p in JUDGED_PERCENTILES else None
        out.append(Metric(f"{key}.{p}", f"{name} {p} (ms)", "lower" if estimate else "info", 1e3, 2, estimate))
    return tuple(out)


METRICS: tuple[Metric, ...] = (
    Metric("output_tokens_per_s", "output tokens/s", "higher", estimate=RATE),
    Metric("output_tokens_per_j", "output tokens/J", "higher", digits=3, estimate=EFFICIENCY),
    *_latency("TTFT", "ttft_s", judged=True),
    *_latency("TPOT", "tpot_s", judged=True),
    Metric("valid", "valid (p99 limits)", "higher"),
    Metric("complete", "complete", "higher"),
    Metric("output_tokens_per_s_per_gpu", "output tokens/s per GPU", "info"),
    Metric("total_tokens_per_s", "total tokens/s", "info"),
    Metric("requests_per_s", "requests/s", "info", digits=3),
    Metric("goodput_requests_per_s", "goodput requests/s", "info", digits=3),
    *_latency("ITL", "itl_s"),
    *_latency("E2E", "e2e_s"),
    Metric("average_power_w", "average power (W)", "info"),
    Metric("energy_j", "energy (J)", "info"),
    Metric("requests_completed", "requests completed", "info", digits=0),
    Metric("requests_failed", "requests failed", "info", digits=0),
    Metric("duration_s", "duration (s)", "info", digits=2),
)
JUDGED: tuple[Metric, ...] = tuple(m for m in METRICS if m.estimate is not None)
# Compared again for each sweep point present in every record, and for each node of a rack.
POINT_METRICS: tuple[Metric, ...] = (*JUDGED, *(m for m in METRICS if m.key == "valid"))
NODE_METRICS: tuple[Metric, ...] = (*JUDGED, *(m for m in METRICS if m.key == "complete"))
# Per-request row field -> the quantiles judged on it (one sampler serves them all).
QUANTILES: dict[str, tuple[float, ...]] = {
    f: tuple(sorted({m.estimate.quantile for m in JUDGED if m.estimate and m.estimate.row_field == f}))
    for f in sorted({m.estimate.row_field for m in JUDGED if m.estimate and m.estimate.source == "rows"})
}


@dataclass(frozen=True, slots=True)
class Options:
    threshold_pct: float = 5.0
    confidence_pct: float = DEFAULT_CONFIDENCE_PCT
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold_pct) and self.threshold_pct >= 0):
            raise ConfigError(f"--threshold must be a percentage >= 0, not {self.threshold_pct}")
        if not 50.0 <= self.confidence_pct < 100.0:
            raise ConfigError(f"--confidence must be between 50 and 100 (percent), not {self.confidence_pct}")
        if not 100 <= self.resamples <= 100_000:
            raise ConfigError(f"--resamples must be between 100 and 100000, not {self.resamples}")


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    base: float | bool | None
    new: float | bool | None
    change_pct: float | None
    verdict: str  # a runner.verdict.Verdict, "info" or "n/a"
    metric: Metric
    ci_pct: tuple[float, float] | None = None
    basis: Basis = ""
    note: str = ""
    node: str | None = None

    @property
    def regressed(self) -> bool:
        return self.verdict == "regression"

    def to_json(self) -> JsonDict:
        return {
            "metric": self.metric.key, "label": self.label, "node": self.node, "base": self.base, "new": self.new,
            "change_pct": self.change_pct,
            "ci_low_pct": self.ci_pct[0] if self.ci_pct else None,
            "ci_high_pct": self.ci_pct[1] if self.ci_pct else None,
            "verdict": self.verdict, "basis": self.basis, "note": self.note,
        }


def lookup(summary: Mapping[str, Any], key: str) -> float | bool | None:
    value: Any = summary
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _side_value(windows: Sequence[Window], key: str) -> float | bool | None:
    """A side's summary value: the mean over its records (a flag: true when true in all)."""
    values = [lookup(w.summary, key) for w in windows]
    if any(v is None for v in values):
        return None
    if all(isinstance(v, bool) for v in values):
        return all(bool(v) for v in values)
    numbers = [float(v) for v in values if v is not None and not isinstance(v, bool)]
    return math.fsum(numbers) / len(numbers) if len(numbers) == len(values) else None


def _change(base: float, new: float) -> float | None:
    if base != 0:
        return (new - base) / abs(base)
    return 0.0 if new == 0 else None


def judge_point(metric: Metric, base: float | bool | None, new: float | bool | None, threshold_pct: float) -> Row:
    """A verdict from the point values alone: flags, information, and judged metrics whose
    records hold no samples."""
    if base is None or new is None:
        return Row(metric.label, base, new, None, "n/a", metric)
    if isinstance(base, bool) or isinstance(new, bool):
        if metric.better == "info":
            return Row(metric.label, base, new, None, "info", metric, basis="info")
        verdict = "regression" if base and not new else "improvement" if new and not base else "no change"
        return Row(metric.label, base, new, None, verdict, metric, basis="flag")
    change = _change(base, new)
    change_pct = None if change is None else change * 100.0
    if metric.better == "info":
        return Row(metric.label, base, new, change_pct, "info", metric, basis="info")
    if change is None:
        worse = new < base if metric.better == "higher" else new > base
        verdict = "regression" if worse else "improvement"
    else:
        verdict = decide(change, change, threshold_pct / 100.0, metric.better)
    note = "no samples in the records: point values only" if metric.estimate is not None else ""
    return Row(metric.label, base, new, change_pct, verdict, metric, basis="point", note=note)


class _Side:
    """One side's windows and, built on first use, its bootstrap replicates per estimate."""

    def __init__(self, windows: Sequence[Window], opts: Options, tag: str) -> None:
        self.windows = list(windows)
        self.opts = opts
        self.tag = tag
        self._rate: tuple[tuple[float, float], list[float], list[float], int] | None = None
        self._quantiles: dict[str, tuple[QuantileSampler, list[list[float]]]] = {}

    def _rng(self, what: str) -> random.Random:
        return random.Random(f"{self.opts.seed}/{self.tag}/{what}")

    def rate(self) -> tuple[tuple[float, float], list[float], list[float], int] | None:
        """(point tokens/s and tokens/J, their replicates, blocks), or None without buckets."""
        if self._rate is None:
            if not all(w.buckets for w in self.windows):
                return None
            sampler = RateSampler([w.buckets for w in self.windows])
            rates, tpjs = sampler.replicates(self._rng("rate"), self.opts.resamples)
            self._rate = (sampler.point(), rates, tpjs, sampler.units)
        return self._rate

    def quantiles(self, row_field: str) -> tuple[QuantileSampler, list[list[float]]] | None:
        if row_field not in self._quantiles:
            if not all(w.rows for w in self.windows):
                return None
            values = [w.values(row_field) for w in self.windows]
            if not any(v for run in values for v in run):
                return None
            sampler = QuantileSampler(values, QUANTILES[row_field])
            self._quantiles[row_field] = (sampler, sampler.replicates(self._rng(row_field), self.opts.resamples))
        return self._quantiles[row_field]


@dataclass(frozen=True, slots=True)
class _Unavailable:
    """Why a side has no replicates for an estimate; ``use_points``: the records hold no
    samples of that kind at all, so the point values are judged instead."""

    reason: str
    use_points: bool


def _estimate(side: _Side, est: Estimate) -> tuple[float, list[float], int] | _Unavailable:
    """(point, replicates, blocks) of a side for one estimate, or why there are none."""
    if est.source in ("rate", "efficiency"):
        rate = side.rate()
        if rate is None:
            return _Unavailable("no 1 s series in the records", True)
        (tps, tpj), rates, tpjs, units = rate
        if est.source == "rate":
            return tps, rates, units
        if math.isnan(tpj):
            return _Unavailable("no energy readings", True)
        return tpj, tpjs, units
    got = side.quantiles(est.row_field)
    if got is None:
        return _Unavailable("no per-request rows", True)
    sampler, reps = got
    if not sampler.enough_for(est.quantile):
        need = math.ceil(MIN_TAIL / min(est.quantile, 1.0 - est.quantile))
        return _Unavailable(f"too few finished requests for p{est.quantile * 100:g} ({sampler.count} < {need})", False)
    return sampler.point()[sampler.quantiles.index(est.quantile)], reps[sampler.quantiles.index(est.quantile)], \
        sampler.units


def judge(metric: Metric, base: _Side, new: _Side, opts: Options) -> Row:
    """A judged metric's row: the interval from both sides' replicates and its verdict."""
    assert metric.estimate is not None
    assert metric.better != "info"
    got_base, got_new = _estimate(base, metric.estimate), _estimate(new, metric.estimate)
    missing = got_base if isinstance(got_base, _Unavailable) else got_new
    if isinstance(missing, _Unavailable):
        point = judge_point(metric, _side_value(base.windows, metric.key), _side_value(new.windows, metric.key),
                            opts.threshold_pct)
        if point.verdict == "n/a" or missing.use_points:
            note = f"{missing.reason}: point values only" if point.verdict != "n/a" else ""
            return Row(point.label, point.base, point.new, point.change_pct, point.verdict, metric,
                       basis=point.basis, note=note)
        # Samples exist but too few for this metric: say so rather than guess from the points.
        return Row(metric.label, point.base, point.new, point.change_pct, "inconclusive", metric, note=missing.reason)
    assert not isinstance(got_base, _Unavailable)
    assert not isinstance(got_new, _Unavailable)
    (b_point, b_reps, b_units), (n_point, n_reps, n_units) = got_base, got_new
    interval: Interval | None = change_interval(
        b_point, n_point, b_reps, n_reps, min(b_units, n_units), opts.confidence_pct / 100.0)
    if interval is None:
        change = _change(b_point, n_point)
        return Row(metric.label, b_point, n_point, None if change is None else change * 100.0, "inconclusive", metric,
                   note="too little data for an interval")
    verdict = decide(interval.low, interval.high, opts.threshold_pct / 100.0, metric.better)
    return Row(metric.label, b_point, n_point, interval.change * 100.0, verdict, metric,
               (interval.low * 100.0, interval.high * 100.0), "bootstrap")


def compare_windows(
    base: Sequence[Window], new: Sequence[Window], opts: Options, metrics: Sequence[Metric] = METRICS,
    tag: str = "whole", prefix: str = "", node: str | None = None,
) -> list[Row]:
    """Rows for every metric either side holds; ``tag`` seeds this window's replicates."""
    b_side, n_side = _Side(base, opts, f"{tag}/base"), _Side(new, opts, f"{tag}/new")
    sweep = any(w.sweep for w in (*base, *new))
    rows = []
    for m in metrics:
        b, n = _side_value(base, m.key), _side_value(new, m.key)
        if b is None and n is None:
            continue
        if m.estimate is not None and sweep:
            shown = judge_point(Metric(m.key, m.label, "info", m.scale, m.digits), b, n, opts.threshold_pct)
            row = Row(m.label, shown.base, shown.new, shown.change_pct, "info", m, basis="info")
        elif m.estimate is not None:
            row = judge(m, b_side, n_side, opts)
        else:
            row = judge_point(m, b, n, opts.threshold_pct)
        rows.append(Row(prefix + row.label, row.base, row.new, row.change_pct, row.verdict, m, row.ci_pct,
                        row.basis, row.note, node))
    return rows


@dataclass(frozen=True, slots=True)
class Comparison:
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regressed]

    def moved_nodes(self) -> list[str]:
        """Nodes with a judged metric that regressed or improved, in row order."""
        seen: dict[str, None] = {}
        for r in self.rows:
            if r.node is not None and r.verdict in ("regression", "improvement"):
                seen[r.node] = None
        return list(seen)


def _common(maps: Sequence[Mapping[str, Window]]) -> list[str]:
    first = list(maps[0]) if maps else []
    return [k for k in first if all(k in m for m in maps[1:])]


def compare_measured(base: Sequence[Measured], new: Sequence[Measured], opts: Options | None = None) -> Comparison:
    """Compare two sides of records of one kind: the whole windows, sweep points present in
    every record, and (rack records) every node present in every record."""
    opts = opts or Options()
    if not base or not new:
        raise ConfigError("each side needs at least one record")
    kinds = {m.kind for m in (*base, *new)}
    if len(kinds) > 1:
        raise ConfigError("cannot compare run records with rack records: give records of one kind on both sides")
    rows = compare_windows([m.whole for m in base], [m.whole for m in new], opts)
    both = (*base, *new)
    for label in _common([m.points for m in both]):
        rows += compare_windows([m.points[label] for m in base], [m.points[label] for m in new], opts,
                                POINT_METRICS, tag=f"point/{label}", prefix=f"[{label}] ")
    for name in _common([m.nodes for m in both]):
        rows += compare_windows([m.nodes[name] for m in base], [m.nodes[name] for m in new], opts,
                                NODE_METRICS, tag=f"node/{name}", prefix=f"[{name}] ", node=name)
    notes = [n for m in both for n in m.notes]
    if any(m.whole.sweep for m in both):
        notes.append("sweep records: the whole run is shown for information, each point is judged")
    names = {*_common([m.nodes for m in base]), *_common([m.nodes for m in new])}
    for name in sorted(names - set(_common([m.nodes for m in both]))):
        notes.append(f"node {name} is not in every record: compared only as part of the rack")
    return Comparison(rows, notes)


def compare(
    base: Mapping[str, Any], new: Mapping[str, Any], threshold_pct: float = 5.0, metrics: Sequence[Metric] = METRICS,
) -> list[Row]:
    """Rows for two records' summaries alone (no samples: point verdicts), as a library call."""
    opts = Options(threshold_pct=threshold_pct)
    return compare_windows([Window(base.get("summary") or {})], [Window(new.get("summary") or {})], opts, metrics)


# --- output --------------------------------------------------------------------------------------
def _fmt(value: float | bool | None, metric: Metric) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value * metric.scale:,.{metric.digits}f}"


def _ci(row: Row) -> str:
    return "-" if row.ci_pct is None else f"[{row.ci_pct[0]:+.1f}, {row.ci_pct[1]:+.1f}]"


def _verdict_cell(row: Row) -> str:
    return f"{row.verdict} (point)" if row.basis == "point" else row.verdict


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1], strict=True)]
        return "  ".join([first, *rest, cells[-1].ljust(widths[-1])]).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]


def render(comparison: Comparison | Sequence[Row], base_name: str, new_name: str, threshold_pct: float,
           confidence_pct: float = DEFAULT_CONFIDENCE_PCT) -> str:
    """Plain-text tables (the records, then their nodes): metric, base, new, change %, the
    interval of the change, verdict; then the conclusion."""
    if not isinstance(comparison, Comparison):
        comparison = Comparison(list(comparison))
    header = ("metric", base_name, new_name, "change %", f"{confidence_pct:g}% CI", "verdict")

    def cells(r: Row) -> tuple[str, ...]:
        change = "-" if r.change_pct is None else f"{r.change_pct:+.1f}"
        return r.label, _fmt(r.base, r.metric), _fmt(r.new, r.metric), change, _ci(r), _verdict_cell(r)

    whole = [r for r in comparison.rows if r.node is None]
    nodes = [r for r in comparison.rows if r.node is not None and r.verdict != "n/a"]
    out = _table(header, [cells(r) for r in whole])
    if nodes:
        out += ["", *_table(("node " + header[0], *header[1:]), [cells(r) for r in nodes])]
    notes = [r for r in comparison.rows if r.note]
    if notes or comparison.notes:
        out.append("")
        out += [f"note: {r.label}: {r.note}" for r in notes]
        out += [f"note: {n}" for n in comparison.notes]
    regressions = [r.label for r in comparison.regressions]
    out.append("")
    if regressions:
        out.append(f"REGRESSION beyond {threshold_pct:g}%: {', '.join(regressions)}")
    else:
        out.append(f"no regression beyond {threshold_pct:g}%")
    inconclusive = [r.label for r in comparison.rows if r.verdict == "inconclusive"]
    if inconclusive:
        out.append(f"inconclusive (the data cannot tell {threshold_pct:g}% from noise): {', '.join(inconclusive)}")
    moved = comparison.moved_nodes()
    if moved:
        out.append(f"nodes that moved: {', '.join(moved)}")
    return "\n".join(out)


def side_names(base: Sequence[str], new: Sequence[str]) -> tuple[str, str]:
    """Column headers: the file names, with their folders when those alone are the same
    (two bundles' rack.json), or how many runs a side has."""
    def name(paths: Sequence[str], fallback: str, deep: bool) -> str:
        if len(paths) != 1:
            return f"{fallback} ({len(paths)} runs)"
        path = Path(paths[0])
        return f"{path.parent.name}/{path.name}" if deep and path.parent.name else path.name

    b, n = name(base, "base", False), name(new, "new", False)
    return (name(base, "base", True), name(new, "new", True)) if b == n else (b, n)


def sides_from_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The base and new record paths: ``BASE NEW`` positionally, or ``--base ... --new ...``."""
    positional = list(args.records or [])
    if args.base or args.new:
        if positional:
            raise ConfigError("give records either as BASE NEW or with --base/--new, not both")
        if not (args.base and args.new):
            raise ConfigError("--base and --new go together")
        return list(args.base), list(args.new)
    if len(positional) != 2:
        raise ConfigError("give two records (BASE NEW) or --base RECORD... --new RECORD...")
    return [positional[0]], [positional[1]]


def main(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """``rackscope compare``: the exit status is ``runner.verdict.exit_code`` of the verdicts."""
    import orjson

    try:
        base_paths, new_paths = sides_from_args(args)
        opts = Options(args.threshold, args.confidence, args.resamples, args.seed)
        base = [measure(p) for p in base_paths]
        new = [measure(p) for p in new_paths]
        comparison = compare_measured(base, new, opts)
    except (ResultError, ConfigError) as exc:
        print(f"rackscope compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        out(orjson.dumps([r.to_json() for r in comparison.rows], option=orjson.OPT_INDENT_2).decode())
    else:
        out(render(comparison, *side_names(base_paths, new_paths), opts.threshold_pct, opts.confidence_pct))
    return exit_code((r.verdict for r in comparison.rows), args.fail_inconclusive)


__all__ = ["METRICS", "Comparison", "Metric", "Options", "Row", "compare", "compare_measured", "load_comparable",
           "main", "render"]
