"""Comparing two records: a side-by-side table of headline metrics and a regression verdict.

The metric list is data: each entry names a key of the records' ``summary`` (dotted for
nested values such as ``ttft_s.p99``) and which direction is better. A metric missing from
either record is skipped, so the same code compares run records (``rackscope.run/1``) and any
other record whose summary uses these keys (``rackscope.rack/1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rackscope.errors import ResultError
from rackscope.runner.results import check_schema, load_json

Better = Literal["higher", "lower", "info"]
FAMILIES = ("rackscope.run", "rackscope.rack")


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # dotted path inside a summary
    label: str
    better: Better
    scale: float = 1.0  # display multiplier (seconds shown as ms)
    digits: int = 1


def _latency(name: str, key: str) -> tuple[Metric, ...]:
    return tuple(
        Metric(f"{key}.{p}", f"{name} {p} (ms)", "lower", 1e3, 2) for p in ("p50", "p90", "p99")
    )


METRICS: tuple[Metric, ...] = (
    Metric("output_tokens_per_s", "output tokens/s", "higher"),
    Metric("output_tokens_per_s_per_gpu", "output tokens/s per GPU", "higher"),
    Metric("total_tokens_per_s", "total tokens/s", "higher"),
    Metric("requests_per_s", "requests/s", "higher", digits=3),
    Metric("goodput_requests_per_s", "goodput requests/s", "higher", digits=3),
    Metric("output_tokens_per_j", "output tokens/J", "higher", digits=3),
    Metric("valid", "valid (p99 limits)", "higher"),
    Metric("complete", "complete", "higher"),
    *_latency("TTFT", "ttft_s"),
    *_latency("TPOT", "tpot_s"),
    *_latency("ITL", "itl_s"),
    *_latency("E2E", "e2e_s"),
    Metric("average_power_w", "average power (W)", "info"),
    Metric("energy_j", "energy (J)", "info"),
    Metric("requests_completed", "requests completed", "info", digits=0),
    Metric("requests_failed", "requests failed", "info", digits=0),
    Metric("duration_s", "duration (s)", "info", digits=2),
)
# Compared again for each sweep point present in both records.
POINT_METRICS = ("output_tokens_per_s", "output_tokens_per_j", "ttft_s.p99", "tpot_s.p99", "valid")


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    base: float | bool | None
    new: float | bool | None
    change_pct: float | None
    verdict: str  # "ok", "better", "REGRESSED", "info", "n/a"
    metric: Metric

    @property
    def regressed(self) -> bool:
        return self.verdict == "REGRESSED"


def lookup(summary: Mapping[str, Any], key: str) -> float | bool | None:
    value: Any = summary
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool | int | float):
        return value
    return None


def judge(metric: Metric, base: float | bool | None, new: float | bool | None, threshold_pct: float) -> Row:
    if base is None or new is None:
        return Row(metric.label, base, new, None, "n/a", metric)
    if isinstance(base, bool) or isinstance(new, bool):
        # A flag that was true and is now false (valid -> invalid, complete -> partial).
        verdict = "REGRESSED" if bool(base) and not bool(new) else "better" if bool(new) and not bool(base) else "ok"
        return Row(metric.label, base, new, None, verdict if metric.better != "info" else "info", metric)
    change = (new - base) / abs(base) * 100.0 if base != 0 else (0.0 if new == 0 else None)
    if metric.better == "info":
        verdict = "info"
    elif change is None:
        worse = (new < base) if metric.better == "higher" else (new > base)
        verdict = "REGRESSED" if worse else "better"
    else:
        signed = change if metric.better == "higher" else -change
        verdict = "REGRESSED" if signed < -threshold_pct else "better" if signed > threshold_pct else "ok"
    return Row(metric.label, base, new, change, verdict, metric)


def _points(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for p in record.get("points") or []:
        if isinstance(p, Mapping) and isinstance(p.get("summary"), Mapping) and isinstance(p.get("point"), Mapping):
            label = ",".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in p["point"].items())
            out[label] = p["summary"]
    return out


def compare(
    base: Mapping[str, Any], new: Mapping[str, Any], threshold_pct: float = 5.0,
    metrics: Sequence[Metric] = METRICS,
) -> list[Row]:
    """Rows for every metric either summary holds, then the key metrics of matching sweep points."""
    b_sum, n_sum = base.get("summary") or {}, new.get("summary") or {}
    rows = []
    for m in metrics:
        b, n = lookup(b_sum, m.key), lookup(n_sum, m.key)
        if b is None and n is None:
            continue
        rows.append(judge(m, b, n, threshold_pct))
    by_key = {m.key: m for m in metrics}
    b_points, n_points = _points(base), _points(new)
    for label in (k for k in b_points if k in n_points):
        for key in POINT_METRICS:
            m = by_key[key]
            b, n = lookup(b_points[label], key), lookup(n_points[label], key)
            if b is None and n is None:
                continue
            rows.append(judge(Metric(m.key, f"[{label}] {m.label}", m.better, m.scale, m.digits), b, n, threshold_pct))
    return rows


def _fmt(value: float | bool | None, metric: Metric) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value * metric.scale:,.{metric.digits}f}"


def render(rows: Sequence[Row], base_name: str, new_name: str, threshold_pct: float) -> str:
    """A plain-text table: metric, base, new, change %, verdict."""
    header = ("metric", base_name, new_name, "change %", "verdict")
    body = [
        (
            r.label,
            _fmt(r.base, r.metric),
            _fmt(r.new, r.metric),
            "-" if r.change_pct is None else f"{r.change_pct:+.1f}",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1], strict=True)]
        return "  ".join([first, *rest, cells[-1].ljust(widths[-1])]).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]
    regressions = [r.label for r in rows if r.regressed]
    if regressions:
        out.append(f"\nREGRESSION beyond {threshold_pct:g}%: {', '.join(regressions)}")
    else:
        out.append(f"\nno regression beyond {threshold_pct:g}%")
    return "\n".join(out)


def load_comparable(path: str | Path) -> dict[str, Any]:
    """A run or rack record with a summary object; ``ResultError`` otherwise."""
    obj = load_json(path)
    check_schema(path, obj, FAMILIES)
    if not isinstance(obj.get("summary"), Mapping):
        raise ResultError(f"{path}: 'summary' missing or not an object")
    return obj
