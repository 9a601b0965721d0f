"""The one module that talks to Grafana's HTTP API, through grafana-client (extra ``grafana``).

Everything it raises is a ``GrafanaError``; grafana-client's and niquests' exceptions stop here.
"""

from __future__ import annotations

from typing import Any

from rackscope.errors import ConfigError, GrafanaError

try:
    import niquests
    from grafana_client.api import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigError(f"pushing to Grafana needs grafana-client ({exc}): pip install 'rackscope[grafana]'") from exc


class Grafana:
    """A Grafana server at ``url`` (``http[s]://host:port[/subpath]``), authenticated with a
    service-account token when one is given (else credentials in the URL, or anonymous)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.url = url
        try:
            self._api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout_s)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad Grafana URL {url!r}: {exc}") from exc

    def _call(self, what: str, method: str, path: str, json: dict[str, Any] | None = None) -> Any:
        try:
            return getattr(self._api.client, method)(path, json=json)
        except GrafanaException as exc:
            raise GrafanaError(f"{what}: Grafana answered {exc.status_code}: {exc.message}") from exc
        except niquests.exceptions.RequestException as exc:
            raise GrafanaError(f"{what}: cannot reach Grafana at {self.url}: {exc}") from exc

    def _exists(self, what: str, path: str) -> bool:
        try:
            self._api.client.GET(path)
        except GrafanaClientError as exc:
            if exc.status_code == 404:
                return False
            raise GrafanaError(f"{what}: Grafana answered {exc.status_code}: {exc.message}") from exc
        except GrafanaException as exc:
            raise GrafanaError(f"{what}: Grafana answered {exc.status_code}: {exc.message}") from exc
        except niquests.exceptions.RequestException as exc:
            raise GrafanaError(f"{what}: cannot reach Grafana at {self.url}: {exc}") from exc
        return True

    def health(self) -> dict[str, Any]:
        """``GET /api/health``; a ``GrafanaError`` until the server answers with its database ok."""
        body = self._call("health check", "GET", "/health")
        if not isinstance(body, dict) or body.get("database") != "ok":
            raise GrafanaError(f"health check: Grafana is not ready: {body!r}")
        return body

    def ensure_folder(self, uid: str, title: str) -> str:
        """Creates the folder unless it exists; returns "created" or "exists"."""
        if self._exists(f"folder {uid}", f"/folders/{uid}"):
            return "exists"
        self._call(f"folder {uid}", "POST", "/folders", {"uid": uid, "title": title})
        return "created"

    def upsert_datasource(self, datasource: dict[str, Any]) -> str:
        """Creates or updates a data source by uid; returns "created" or "updated"."""
        uid = datasource["uid"]
        what = f"data source {uid}"
        if self._exists(what, f"/datasources/uid/{uid}"):
            self._call(what, "PUT", f"/datasources/uid/{uid}", datasource)
            return "updated"
        self._call(what, "POST", "/datasources", datasource)
        return "created"

    def upload_dashboard(self, dashboard: dict[str, Any], folder_uid: str, message: str) -> dict[str, Any]:
        """Creates or overwrites a dashboard (matched by uid); returns Grafana's answer."""
        body = {"dashboard": {**dashboard, "id": None}, "folderUid": folder_uid, "overwrite": True,
                "message": message}
        answer: dict[str, Any] = self._call(f"dashboard {dashboard.get('uid')}", "POST", "/dashboards/db", body)
        return answer
