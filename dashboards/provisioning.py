"""Grafana data sources and the dashboard provider, defined once for the provisioning files,
`rackscope dashboards push` and the Kubernetes manifests.

Alerting choice: alert rules are Prometheus rules (dashboards/rules), routed by Alertmanager.
Grafana gets an Alertmanager data source to show and silence those alerts, and the Prometheus
data source has ``manageAlerts`` so Grafana lists the rules; Grafana evaluates no rule itself.
"""

from __future__ import annotations

from typing import Any

FOLDER_UID = "rackscope"
FOLDER_TITLE = "rackscope"
PROMETHEUS_UID = "rackscope-prometheus"
ALERTMANAGER_UID = "rackscope-alertmanager"
# Where the compose stack's Grafana finds the generated dashboards (mounted read-only).
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/rackscope"
SCRAPE_INTERVAL = "5s"  # must match the Prometheus scrape interval: Grafana sizes $__rate_interval from it


def prometheus_datasource(url: str) -> dict[str, Any]:
    return {
        "name": "rackscope Prometheus",
        "type": "prometheus",
        "uid": PROMETHEUS_UID,
        "access": "proxy",
        "url": url,
        "isDefault": True,
        "jsonData": {
            "httpMethod": "POST",
            "timeInterval": SCRAPE_INTERVAL,
            "prometheusType": "Prometheus",
            "manageAlerts": True,
            "alertmanagerUid": ALERTMANAGER_UID,
        },
    }


def alertmanager_datasource(url: str) -> dict[str, Any]:
    return {
        "name": "rackscope Alertmanager",
        "type": "alertmanager",
        "uid": ALERTMANAGER_UID,
        "access": "proxy",
        "url": url,
        "isDefault": False,
        "jsonData": {"implementation": "prometheus", "handleGrafanaManagedAlerts": False},
    }


def datasources_file(prometheus_url: str) -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{**prometheus_datasource(prometheus_url), "editable": False}]}


def alerting_file(alertmanager_url: str) -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{**alertmanager_datasource(alertmanager_url), "editable": False}]}


def dashboard_provider_file() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "rackscope",
                "orgId": 1,
                "folder": FOLDER_TITLE,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": DASHBOARDS_PATH},
            }
        ],
    }
