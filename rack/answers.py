"""The agent control API's answers as the coordinator accepts them (strict pydantic models).

The models follow what ``rackscope agent`` sends (agent/api.py, agent/runs.py).

Fields the coordinator reads must have exactly their type (no coercion: ``"12"`` is not a
number, ``1`` is not ``true``); fields it does not read pass through, so a newer agent may add
some. A wrong number is worse than a missing one, so a field of the wrong type fails the
answer, and with it that node."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rackscope.runner.config import MAX_TEXT_CHARS, TEXT_PATTERN

MAX_GPUS_PER_NODE = 1024
MAX_BUCKETS = 1_000_000  # a 1 s series of eleven days
MAX_RUN_ID_CHARS = 128  # the agents' identifier rule (runner/config.py)

# Names are printed on the operator's terminal: no control characters (escape sequences), the
# rule the run config applies to its own text fields.
Name = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=TEXT_PATTERN)]
Label = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
# Unix seconds: positive and before the year 5138, so no arithmetic on them can blow up.
UnixTime = Annotated[float, Field(gt=0, lt=1e11, allow_inf_nan=False)]
RunStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
Series = Annotated[list[Amount], Field(max_length=MAX_BUCKETS)]


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class NodeAnswer(_Answer):
    """``GET /v1/node``: the agent's identity and its GPUs."""

    rack: Name
    node: Name
    source: Label
    simulated: bool
    gpu_model: Label
    version: Label
    gpus: Annotated[list[dict[str, Any]], Field(max_length=MAX_GPUS_PER_NODE)]


class RunSummary(_Answer):
    """A run's ``summary``: the figures a rack record adds up."""

    complete: bool
    stop_reason: str | None = None
    gpus: Count | None = None
    duration_s: Amount | None = None
    output_tokens: Amount | None = None
    output_tokens_per_s: Amount | None = None
    output_tokens_per_s_per_gpu: Amount | None = None
    requests_completed: Count | None = None
    requests_failed: Count | None = None
    energy_j: Amount | None = None
    average_power_w: Amount | None = None
    output_tokens_per_j: Amount | None = None


class RunView(_Answer):
    """``POST /v1/runs`` (201), ``GET /v1/runs/{id}`` and ``POST /v1/runs/{id}/cancel``."""

    run_id: Annotated[str, Field(min_length=1, max_length=MAX_RUN_ID_CHARS)]
    status: RunStatus
    continuous: bool
    start_at: UnixTime | None
    config: dict[str, Any]
    created_at: UnixTime
    started_at: UnixTime | None
    ended_at: UnixTime | None
    summary: RunSummary | None
    record_path: str | None
    error: str | None


class Timeseries(_Answer):
    """A record's 1 s series: what the rack's summed series is built from."""

    bucket_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    output_tokens_per_s: Series
    power_w: Series | None = None

    @model_validator(mode="after")
    def _same_length(self) -> Timeseries:
        if self.power_w is not None and len(self.power_w) != len(self.output_tokens_per_s):
            raise ValueError("power_w and output_tokens_per_s must have one value per bucket each")
        return self


class RunRecord(_Answer):
    """``GET /v1/runs/{id}/record``: the node's ``rackscope.run/1`` record."""

    schema_: str = Field(alias="schema")
    run_id: Annotated[str, Field(min_length=1, max_length=MAX_RUN_ID_CHARS)]
    config: dict[str, Any]
    environment: dict[str, Any]
    summary: RunSummary
    timeseries: Timeseries | None = None


def describe(exc: ValidationError) -> str:
    """The first thing wrong with an answer, by its place in the answer: ``summary.gpus: ...``."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return "does not match the agent's API"
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "answer"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


__all__ = ["NodeAnswer", "RunRecord", "RunStatus", "RunSummary", "RunView", "Timeseries", "describe"]
