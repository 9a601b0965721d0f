"""A bounded in-memory log of recent lines, served at ``GET /v1/logs`` so a rack run can
collect every agent's log into its results bundle."""

from __future__ import annotations

import collections
import logging
import threading

from rackscope.logs import formatter

DEFAULT_LINES = 2000


class LogBuffer(logging.Handler):
    def __init__(self, capacity: int = DEFAULT_LINES) -> None:
        super().__init__(level=logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(formatter())
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 -- a bad log call must not break the caller (logging's own rule)
            self.handleError(record)
            return
        with self._lines_lock:
            self.lines.append(line)

    def text(self) -> str:
        with self._lines_lock:
            return "".join(line + "\n" for line in self.lines)


_buffer: LogBuffer | None = None
_install_lock = threading.Lock()


def process_log() -> LogBuffer:
    """The process's buffer, attached to the root logger on first use. Logging is process-wide,
    so agents sharing a process (the demo) share it; their lines name their node."""
    global _buffer  # noqa: PLW0603 -- one buffer per process, created on first use
    with _install_lock:
        if _buffer is None:
            _buffer = LogBuffer()
            logging.getLogger().addHandler(_buffer)
        return _buffer
