"""Ctrl-C and SIGTERM during a run: the first stops it with a partial record, a second ends the process."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

log = logging.getLogger(__name__)


class Signals:
    """Ctrl-C / SIGTERM set the cancel event (a partial record is written); a second one
    falls back to the default handler and ends the process at once."""

    def __init__(self, cancel: asyncio.Event, also: threading.Event | None = None) -> None:
        self.cancel = cancel
        self.also = also  # a thread-side flag to raise as well (worker processes)
        self.received: int | None = None
        self._loop = asyncio.get_running_loop()
        self._installed: list[int] = []

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass
        return self

    def _on_signal(self, sig: int) -> None:
        if self.received is None:
            self.received = sig
            log.warning("%s received: stopping the run and writing a partial record", signal.Signals(sig).name)
            self.cancel.set()
            if self.also is not None:
                self.also.set()
            return
        self.__exit__()
        signal.raise_signal(sig)

    def __exit__(self, *exc: object) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()
