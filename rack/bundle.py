"""The results bundle of a rack run: its folder layout and atomic writes into it.

    OUTPUT/rack.json                          the rack record (rackscope.rack/1)
    OUTPUT/config.json                        what was asked: agents, run config, timings
    OUTPUT/nodes/NODE/node.json               the agent's identity at the start
    OUTPUT/nodes/NODE/run.json                the agent's last view of the run
    OUTPUT/nodes/NODE/RUN_ID.json             the node's run record (rackscope.run/1)
    OUTPUT/nodes/NODE/RUN_ID.requests.jsonl   its per-request rows
    OUTPUT/nodes/NODE/agent.log               the agent's recent log lines
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rackscope.errors import ConfigError, ResultError
from rackscope.fileio import write_bytes, write_json

RACK_FILE = "rack.json"
CONFIG_FILE = "config.json"
NODES_DIR = "nodes"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 64


def safe_name(text: str) -> str:
    """A file-name-safe version of an agent-supplied name (never a path)."""
    cleaned = _UNSAFE.sub("_", text).strip("._") or "node"
    return cleaned[:MAX_NAME_CHARS]


class Bundle:
    """The results folder of one rack run; every write is atomic (temporary file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if (self.root / RACK_FILE).exists():
            raise ConfigError(f"{self.root} already holds a rack run ({RACK_FILE}); choose another --output")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.root}: {exc.strerror or exc}") from exc

    def path(self, relative: str) -> Path:
        return self.root / relative

    def prepare(self, relative: str) -> Path:
        """The path of ``relative``, with its folder created."""
        target = self.path(relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
        return target

    def write_json(self, relative: str, obj: Any) -> None:
        write_json(self.prepare(relative), obj)

    def write_bytes(self, relative: str, data: bytes) -> None:
        write_bytes(self.prepare(relative), data)


def node_file(key: str, name: str) -> str:
    """Where a node's file goes inside the bundle."""
    return f"{NODES_DIR}/{key}/{name}"


__all__ = ["CONFIG_FILE", "NODES_DIR", "RACK_FILE", "Bundle", "node_file", "safe_name"]
