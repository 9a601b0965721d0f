"""Log lines that cannot be forged: one formatter escapes control characters in every record.

Log messages carry text from peers (an exporter's label values, a server's error body, a
caller's run id). A newline in such text would start a fake log line, an escape sequence would
repaint the operator's terminal; escaping at the formatter covers every logger at once instead
of trusting each call site to remember."""

from __future__ import annotations

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls except tab, DEL, and the C1 controls (some terminals act on them too).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    r"""``text`` with each control character written as a visible escape (``\n``, ``\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """Formats as usual, then escapes control characters in the message and the traceback; a
    traceback keeps its line breaks so it stays readable, but every line of it is indented, so
    no text inside it can pass for a log line of its own (those start at column 0)."""

    def format(self, record: logging.LogRecord) -> str:
        saved_msg, saved_args, saved_exc_text = record.msg, record.args, record.exc_text
        try:
            record.msg = escape(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = "\n".join("    " + escape(line) for line in record.exc_text.split("\n"))
            return super().format(record)
        finally:
            record.msg, record.args, record.exc_text = saved_msg, saved_args, saved_exc_text


def formatter() -> logging.Formatter:
    return EscapingFormatter(FORMAT)
