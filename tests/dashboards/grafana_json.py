"""Reading the generated dashboards the way Grafana does: panels, their PromQL targets, the
annotation queries, and template-variable substitution."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "dashboards" / "generated"
DASHBOARD_FILES = ("rack-overview.json", "node-detail.json", "run-comparison.json")

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GENERATED / name).read_text())
    return data


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: load(name) for name in DASHBOARD_FILES}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def targets(name: str, dashboard: Mapping[str, Any]) -> Iterator[Target]:
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            yield Target(name, panel["title"], t["refId"], t["expr"], bool(t.get("instant")))


def annotation_exprs(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(a["name"], a["expr"]) for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replaces $name and ${name}; every variable used must be in ``values``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def builtin_values(rate_interval: str, range_: str, interval: str) -> dict[str, str]:
    return {"__rate_interval": rate_interval, "__range": range_, "__interval": interval}
