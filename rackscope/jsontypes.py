"""The JSON type aliases every part of rackscope shares (declared once, imported everywhere)."""

from __future__ import annotations

from typing import Any, TypeAlias

# A decoded JSON object: records, summaries, rows, API bodies. Values stay ``Any`` because a
# record nests freely; the schema checks live where each record is loaded.
JsonDict: TypeAlias = dict[str, Any]

__all__ = ["JsonDict"]
