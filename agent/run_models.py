"""The body of ``POST /v1/runs``: every ``RunConfig`` field (optional), plus ``start_at``.

Built from the dataclass itself so the API schema never drifts from what the runner accepts;
``RunConfig.from_dict`` still does the semantic checks (422 with its message)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from rackscope.runner.scenarios import RunConfig

# Set by the agent from its own identity, never by the caller.
AGENT_OWNED = ("rack", "node")


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in AGENT_OWNED:
            continue
        kind = hints[f.name]
        if kind is str or kind == (str | None):
            kind = str | None
            out[f.name] = (kind, Field(default=None, max_length=4096))
            continue
        out[f.name] = (kind | None, None)
    out["start_at"] = (
        float | None,
        Field(default=None, description="unix seconds at which to start, so a rack starts together"),
    )
    return out


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


RunBody: type[BaseModel] = create_model("RunBody", __base__=_Base, **_fields())
