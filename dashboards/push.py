"""``rackscope dashboards push``: upload the generated dashboards and the data sources to an
existing Grafana, after waiting for it to report healthy.

Alert rules are not uploaded: they are Prometheus rules (dashboards/rules), evaluated by
Prometheus and routed by Alertmanager; Grafana shows them through its data sources.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rackscope.dashboards import provisioning
from rackscope.errors import ConfigError, GrafanaError

GENERATED = Path(__file__).resolve().parent / "generated"
HEALTH_POLL_S = 1.0


class GrafanaLike(Protocol):
    def health(self) -> dict[str, Any]: ...
    def ensure_folder(self, uid: str, title: str) -> str: ...
    def upsert_datasource(self, datasource: dict[str, Any]) -> str: ...
    def upload_dashboard(self, dashboard: dict[str, Any], folder_uid: str, message: str) -> dict[str, Any]: ...


@dataclass
class PushOptions:
    prometheus_url: str | None = "http://prometheus:9090"  # as Grafana's server reaches it; None: skip
    alertmanager_url: str | None = "http://alertmanager:9093"
    folder_uid: str = provisioning.FOLDER_UID
    folder_title: str = provisioning.FOLDER_TITLE
    wait_s: float = 60.0
    dashboards_dir: Path = GENERATED


def load_dashboards(directory: Path) -> list[dict[str, Any]]:
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise ConfigError(f"no dashboards in {directory}: run `rackscope dashboards build`")
    out = []
    for path in paths:
        try:
            dashboard = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read dashboard {path}: {exc}") from exc
        if not isinstance(dashboard, dict) or not dashboard.get("uid") or not dashboard.get("title"):
            raise ConfigError(f"{path} is not a dashboard with a uid and a title")
        out.append(dashboard)
    return out


def wait_healthy(grafana: GrafanaLike, wait_s: float, sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Polls /api/health until Grafana answers ok or ``wait_s`` has passed (then re-raises)."""
    deadline = now() + wait_s
    while True:
        try:
            return grafana.health()
        except GrafanaError:
            if now() + HEALTH_POLL_S > deadline:
                raise
            sleep(HEALTH_POLL_S)


def push(grafana: GrafanaLike, options: PushOptions, report: Callable[[str], None]) -> int:
    """Pushes everything; returns how many dashboards were uploaded."""
    dashboards = load_dashboards(options.dashboards_dir)  # fail on a broken checkout before touching Grafana
    health = wait_healthy(grafana, options.wait_s)
    report(f"Grafana {health.get('version', '?')} is healthy")
    state = grafana.ensure_folder(options.folder_uid, options.folder_title)
    report(f"folder {options.folder_uid}: {state}")
    datasources = []
    if options.prometheus_url:
        datasources.append(provisioning.prometheus_datasource(options.prometheus_url))
    if options.alertmanager_url:
        datasources.append(provisioning.alertmanager_datasource(options.alertmanager_url))
    for ds in datasources:
        report(f"data source {ds['uid']} ({ds['type']}, {ds['url']}): {grafana.upsert_datasource(ds)}")
    for dashboard in dashboards:
        answer = grafana.upload_dashboard(dashboard, options.folder_uid, "rackscope dashboards push")
        report(f"dashboard {dashboard['uid']} ({dashboard['title']}): version {answer.get('version', '?')}, "
               f"{answer.get('url', '')}")
    report("alert rules: Prometheus rules (dashboards/rules), shown in Grafana through the "
           f"{provisioning.ALERTMANAGER_UID} data source; nothing to upload")
    return len(dashboards)
