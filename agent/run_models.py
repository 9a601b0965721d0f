"""The body of ``POST /v1/runs``: every run setting the API accepts (optional), plus ``start_at``.

Derived from the one declaration in ``rackscope.runner.config``: each field keeps the
setting's type (strict: ``true`` is not a number, ``"5"`` is not an integer), bounds, choices,
length and pattern, so the published schema says what is accepted and a value out of bounds
is refused (422) before anything else sees it. ``RunConfig.from_dict`` then checks the rules
between fields."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from rackscope.runner.config import SETTINGS, Setting

# The schema's bound on start_at, only so that it is a bounded number; the window a start may
# lie in (the next hour) is checked against the clock by RunManager.config_from_body.
MAX_START_AT = 2.0**34  # unix seconds, year 2514


def _number_bounds(s: Setting) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    if s.minimum is not None:
        bounds["gt" if s.exclusive_minimum else "ge"] = s.minimum
    if s.maximum is not None:
        bounds["le"] = s.maximum
    return bounds


def annotation(s: Setting) -> Any:
    """The pydantic type of setting ``s`` (without ``None``)."""
    if s.kind == "bool":
        return Annotated[bool, Strict()]
    if s.kind == "int":
        return Annotated[int, Strict(), Field(**_number_bounds(s))]
    if s.kind == "float":
        return Annotated[float, Strict(), Field(allow_inf_nan=False, **_number_bounds(s))]
    if s.kind == "floats":
        item = Annotated[float, Strict(), Field(allow_inf_nan=False, **_number_bounds(s))]
        return Annotated[list[item], Field(max_length=s.max_length)]
    if s.choices is not None:
        # A snapshot: the engine choices are a live view of the engine registry.
        return typing.Literal[tuple(s.choices)]
    return Annotated[str, Strict(), Field(max_length=s.max_length, pattern=s.pattern)]


def description(s: Setting) -> str:
    bounds = s.bounds_text()
    return s.help + (f"; {bounds}" if bounds else "")


def _fields() -> dict[str, Any]:
    out: dict[str, Any] = {
        s.name: (annotation(s) | None, Field(default=None, description=description(s)))
        for s in SETTINGS.values()
        if s.remote
    }
    out["start_at"] = (
        Annotated[float, Strict(), Field(ge=0, le=MAX_START_AT, allow_inf_nan=False)] | None,
        Field(default=None, description="unix seconds at which to start (within the next hour), so a rack "
                                        "starts together"),
    )
    return out


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


RunBody: type[BaseModel] = create_model("RunBody", __base__=_Base, **_fields())
