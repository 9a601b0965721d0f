"""`rackscope dashboards push` against a stand-in Grafana.

No Grafana runs here, so a small HTTP server on 127.0.0.1 plays it. It answers only the
routes of Grafana's documented HTTP API that push uses and checks each request against that
documentation (method, path, auth header, required JSON fields), recording any violation:
  GET  /api/health                  -> {"database": "ok", "version", "commit"}      (Health API)
  GET  /api/folders/:uid            -> 200 folder | 404                             (Folder API)
  POST /api/folders                 {"title" required, "uid"}                        (Folder API)
  GET  /api/datasources/uid/:uid    -> 200 | 404                                    (Data source API)
  POST /api/datasources             {"name", "type", "access", "url"}                (Data source API)
  PUT  /api/datasources/uid/:uid    {"name", "type", "access", "url"}                (Data source API)
  POST /api/dashboards/db           {"dashboard" (title, uid, id null), "folderUid", "overwrite", "message"}
                                    -> {"id", "uid", "url", "status", "version", "slug"} (Dashboard API)
Anything else is a 404 and a violation. The client is the real grafana-client over real HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rackscope.cli import main
from rackscope.dashboards.grafana_api import Grafana
from rackscope.dashboards.push import PushOptions, push
from rackscope.errors import GrafanaError
from tests.dashboards import grafana_json as gj

TOKEN = "glsa_test_token"


@dataclass
class GrafanaState:
    unhealthy_first: int = 0  # answer 503 to this many health checks first
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    reject_dashboards: bool = False


def _require(state: GrafanaState, body: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> bool:
    if not isinstance(body, dict):
        state.violations.append(f"{where}: body is not a JSON object")
        return False
    ok = True
    for name, kind in fields.items():
        if name not in body or not isinstance(body[name], kind):
            state.violations.append(f"{where}: missing or mistyped {name!r}")
            ok = False
    return ok


def make_handler(state: GrafanaState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                state.violations.append(f"{self.command} {self.path}: Content-Type is not application/json")
            length = int(self.headers.get("Content-Length", "0"))
            return json.loads(self.rfile.read(length) or b"null")

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"message": "Unauthorized"})
                return False
            return True

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            if self.path == "/api/health":  # the health endpoint needs no auth
                if state.unhealthy_first > 0:
                    state.unhealthy_first -= 1
                    self._send(503, {"database": "failing"})
                else:
                    self._send(200, {"commit": "abc", "database": "ok", "version": "11.6.3"})
                return
            if not self._authorized():
                return
            if self.path.startswith("/api/folders/"):
                uid = self.path.rsplit("/", 1)[1]
                if uid in state.folders:
                    self._send(200, state.folders[uid])
                else:
                    self._send(404, {"message": "folder not found", "status": "not-found"})
            elif self.path.startswith("/api/datasources/uid/"):
                uid = self.path.rsplit("/", 1)[1]
                if uid in state.datasources:
                    self._send(200, state.datasources[uid])
                else:
                    self._send(404, {"message": "Data source not found"})
            else:
                state.violations.append(f"GET {self.path}: not a route push should use")
                self._send(404, {"message": "Not found"})

        def do_POST(self) -> None:
            state.requests.append(("POST", self.path))
            if not self._authorized():
                return
            body = self._body()
            if self.path == "/api/folders":
                if _require(state, body, {"title": str}, "POST /api/folders"):
                    uid = body.get("uid") or "generated"
                    if uid in state.folders:
                        self._send(409, {"message": "a folder with the same uid already exists"})
                        return
                    state.folders[uid] = {"id": len(state.folders) + 1, "uid": uid, "title": body["title"],
                                          "url": f"/dashboards/f/{uid}/"}
                    self._send(200, state.folders[uid])
                    return
            elif self.path == "/api/datasources":
                fields: dict[str, type | tuple[type, ...]] = {"name": str, "type": str, "access": str, "url": str}
                if _require(state, body, fields, "POST /api/datasources"):
                    if body["access"] not in ("proxy", "direct"):
                        state.violations.append("POST /api/datasources: access must be proxy or direct")
                    uid = body.get("uid") or "generated"
                    state.datasources[uid] = {**body, "id": len(state.datasources) + 1}
                    self._send(200, {"datasource": state.datasources[uid], "id": state.datasources[uid]["id"],
                                     "message": "Datasource added", "name": body["name"]})
                    return
            elif self.path == "/api/dashboards/db":
                fields = {"dashboard": dict, "overwrite": bool, "folderUid": str, "message": str}
                if _require(state, body, fields, "POST /api/dashboards/db"):
                    dashboard = body["dashboard"]
                    _require(state, dashboard, {"title": str, "uid": str}, "dashboard")
                    if dashboard.get("id") is not None:
                        state.violations.append("dashboard.id must be null to create or overwrite by uid")
                    if body["folderUid"] not in state.folders:
                        state.violations.append(f"folderUid {body['folderUid']!r} does not exist")
                    if state.reject_dashboards:
                        self._send(412, {"message": "The dashboard has been changed by someone else",
                                         "status": "version-mismatch"})
                        return
                    uid = dashboard["uid"]
                    version = state.dashboards.get(uid, {}).get("version", 0) + 1
                    state.dashboards[uid] = {"dashboard": dashboard, "version": version, "folderUid": body["folderUid"]}
                    self._send(200, {"id": 1, "uid": uid, "url": f"/d/{uid}/x", "status": "success",
                                     "version": version, "slug": "x"})
                    return
            else:
                state.violations.append(f"POST {self.path}: not a route push should use")
            self._send(400, {"message": "bad request"})

        def do_PUT(self) -> None:
            state.requests.append(("PUT", self.path))
            if not self._authorized():
                return
            body = self._body()
            if self.path.startswith("/api/datasources/uid/"):
                uid = self.path.rsplit("/", 1)[1]
                fields: dict[str, type | tuple[type, ...]] = {"name": str, "type": str, "access": str, "url": str}
                if _require(state, body, fields, "PUT /api/datasources/uid") and uid in state.datasources:
                    state.datasources[uid] = {**body, "id": state.datasources[uid]["id"]}
                    self._send(200, {"datasource": state.datasources[uid], "message": "Datasource updated"})
                    return
            else:
                state.violations.append(f"PUT {self.path}: not a route push should use")
            self._send(400, {"message": "bad request"})

    return Handler


@pytest.fixture
def grafana() -> Iterator[tuple[str, GrafanaState]]:
    state = GrafanaState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_push_waits_for_health_then_uploads_everything(grafana: tuple[str, GrafanaState]) -> None:
    url, state = grafana
    state.unhealthy_first = 2
    lines: list[str] = []
    count = push(Grafana(url, TOKEN), PushOptions(wait_s=10), lines.append)
    assert state.violations == []
    assert count == 3
    assert state.requests[:3] == [("GET", "/api/health")] * 3
    assert set(state.dashboards) == {d["uid"] for d in gj.dashboards().values()}
    for uid, stored in state.dashboards.items():
        assert stored["folderUid"] == "rackscope"
        assert stored["version"] == 1
        (original,) = [d for d in gj.dashboards().values() if d["uid"] == uid]
        assert stored["dashboard"] == {**original, "id": None}
    assert state.datasources["rackscope-prometheus"]["url"] == "http://prometheus:9090"
    assert state.datasources["rackscope-prometheus"]["isDefault"] is True
    assert state.datasources["rackscope-alertmanager"]["type"] == "alertmanager"
    assert lines[0] == "Grafana 11.6.3 is healthy"
    assert "folder rackscope: created" in lines
    assert any(line.startswith("data source rackscope-prometheus (prometheus, http://prometheus:9090): created")
               for line in lines)
    assert any("rackscope-rack-overview" in line and "version 1" in line for line in lines)
    assert "nothing to upload" in lines[-1]

    # A second push overwrites: folder kept, data sources updated in place, dashboards at version 2.
    state.requests.clear()
    lines.clear()
    push(Grafana(url, TOKEN), PushOptions(prometheus_url="http://prom.example:9090", alertmanager_url=None),
         lines.append)
    assert state.violations == []
    assert "folder rackscope: exists" in lines
    assert ("PUT", "/api/datasources/uid/rackscope-prometheus") in state.requests
    assert state.datasources["rackscope-prometheus"]["url"] == "http://prom.example:9090"
    assert not any(path.endswith("rackscope-alertmanager") for _, path in state.requests)
    assert {d["version"] for d in state.dashboards.values()} == {2}


@pytest.mark.slow
def test_cli_takes_the_token_from_the_environment(grafana: tuple[str, GrafanaState],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, state = grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert main(["dashboards", "push", "--grafana-url", url, "--wait", "5"]) == 0
    assert state.violations == []
    assert f"pushed 3 dashboard(s) to {url}" in capsys.readouterr().out


@pytest.mark.slow
def test_wrong_token_is_an_error(grafana: tuple[str, GrafanaState], monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    url, state = grafana
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert main(["dashboards", "push", "--grafana-url", url, "--grafana-token", "wrong", "--wait", "1"]) == 1
    err = capsys.readouterr().err
    assert "401" in err
    assert "folder rackscope" in err
    assert state.dashboards == {}


@pytest.mark.slow
def test_a_rejected_dashboard_is_reported(grafana: tuple[str, GrafanaState]) -> None:
    url, state = grafana
    state.reject_dashboards = True
    with pytest.raises(GrafanaError, match=r"412.*changed by someone else"):
        push(Grafana(url, TOKEN), PushOptions(wait_s=1), lambda _: None)


def test_unreachable_grafana_fails_after_the_wait(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["dashboards", "push", "--grafana-url", f"http://127.0.0.1:{port}", "--wait", "0"]) == 1
    assert "cannot reach Grafana" in capsys.readouterr().err


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboards", "push", "--grafana-url", "http://127.0.0.1:1", "--wait", "-1"]) == 2
    assert "--wait" in capsys.readouterr().err
