"""Log lines cannot be forged: control characters from peers are escaped by the one formatter."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rackscope.logs import EscapingFormatter, escape, formatter
from tests.helpers import rackscope_command, start_limited, stop_process, wait_for

PAGE = (Path(__file__).parents[1] / "agent" / "sources" / "data" / "h100x4_exporter3.prom").read_text()
FORGED = "2030-01-01 00:00:00,000 ERROR rackscope.agent: GPU 0 is on fire"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain text, tabs\tkept", "plain text, tabs\tkept"),
        ("line\nforged", "line\\nforged"),
        ("carriage\rreturn", "carriage\\rreturn"),
        ("\x1b[2Jrepaint", "\\x1b[2Jrepaint"),
        ("nul\x00 del\x7f c1\x9b", "nul\\x00 del\\x7f c1\\x9b"),
        ("ünïcode stays", "ünïcode stays"),
    ],
)
def test_escape(text: str, escaped: str) -> None:
    assert escape(text) == escaped


def test_the_formatter_escapes_messages_and_arguments_and_leaves_the_record_alone() -> None:
    record = logging.LogRecord("rackscope.test", logging.WARNING, __file__, 1, "label %s\nmore", ("x\ny",), None)
    line = formatter().format(record)
    assert "\n" not in line
    assert line.endswith("WARNING rackscope.test: label x\\ny\\nmore")
    assert (record.msg, record.args) == ("label %s\nmore", ("x\ny",))


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_log_line() -> None:
    try:
        raise ValueError(f"peer said\n{FORGED}")
    except ValueError:
        record = logging.LogRecord("rackscope.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    text = EscapingFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    first, *rest = text.split("\n")
    assert first == "ERROR rackscope.test: failed"
    assert rest and all(line.startswith("    ") for line in rest)
    assert f"    {FORGED}" in rest  # the exception's own line break stays, indented like the rest


class _Exporter:
    """Serves one recorded dcgm-exporter page whose label values carry newlines."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"


@pytest.fixture
def exporter() -> Iterator[_Exporter]:
    # The text format writes a newline in a label value as \n; the parser turns it back into one.
    page = PAGE.replace('modelName="NVIDIA H100 80GB HBM3"', f'modelName="NVIDIA H100\\n{FORGED}"')
    page = page.replace('Hostname="hgx-h100-03"', f'Hostname="hgx-h100-03\\n{FORGED}"')
    served = _Exporter(page)
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.mark.slow
def test_a_dcgm_label_with_a_newline_stays_inside_one_escaped_log_line(exporter: _Exporter) -> None:
    proc = start_limited(
        rackscope_command("agent", "--source", "dcgm", "--dcgm-url", exporter.url, "--metrics-port", "0", "--no-api"),
        stdout=subprocess.DEVNULL,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        stderr = proc.stderr
        threading.Thread(target=lambda: lines.extend(stderr), daemon=True).start()
        wait_for("the agent's ready line", lambda: any("rackscope agent ready" in line for line in lines), 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    wait_for("stderr to close", lambda: any("agent stopped" in line for line in lines))
    mentions = [line for line in lines if "on fire" in line]
    # The exporter's host name and the GPU model each reach the log once, escaped within one line.
    assert len([line for line in mentions if f"hgx-h100-03\\n{FORGED}" in line]) == 1, "".join(lines)
    assert len([line for line in mentions if f"NVIDIA H100\\n{FORGED}" in line]) == 1, "".join(lines)
    assert all(LOG_LINE.match(line) for line in mentions), mentions
    assert not [line for line in lines if line.startswith(FORGED)]
