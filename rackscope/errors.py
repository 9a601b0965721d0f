"""The one exception hierarchy of rackscope.

    RackscopeError                  base of everything we raise on purpose
    ├── ConfigError                 bad flags, settings or files (CLI exits 2)
    ├── SourceUnavailable           a GPU source cannot start here (has .hint)
    ├── SourceError                 a started GPU source failed to sample
    ├── EngineUnavailable           an engine cannot start here (missing extra, server down)
    ├── EngineError                 an engine failed while running
    ├── RunError                    a run could not be carried out
    │   ├── RunConflict             another run already holds this agent, or the run id is taken
    │   └── RunNotFound             no run of that id on this agent
    ├── ResultError                 a result file is missing or malformed
    ├── PeerError                   a peer (exporter, server, agent) answered wrongly, too much or too slowly
    └── GrafanaError                Grafana unreachable or refused a request (dashboards push)

Third-party errors are translated at the edge with ``raise X(...) from exc`` so callers see
only these types.
"""

from __future__ import annotations


class RackscopeError(Exception):
    """Base of every error rackscope raises on purpose."""


class ConfigError(RackscopeError):
    """Bad flags, settings or configuration files."""


class SourceUnavailable(RackscopeError):
    """A GPU source cannot start on this machine; ``hint`` says what to do instead."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} (hint: {hint})" if hint else message)
        self.hint = hint


class SourceError(RackscopeError):
    """A started GPU source failed to produce a sample."""


class EngineUnavailable(RackscopeError):
    """An engine cannot start here (missing optional extra, unreachable server)."""


class EngineError(RackscopeError):
    """An engine failed while serving requests."""


class RunError(RackscopeError):
    """A benchmark run could not be carried out."""


class RunConflict(RunError):
    """Another run is already active on this agent, or its run id is already used."""


class RunNotFound(RunError):
    """No run of that id on this agent."""


class ResultError(RackscopeError):
    """A result or report file is missing or malformed."""


class PeerError(RackscopeError):
    """A peer (dcgm-exporter, an inference server, another agent) was unreachable, too slow,
    sent too much or sent something malformed; callers translate it to their own error."""


class GrafanaError(RackscopeError):
    """Grafana was unreachable or refused a request (``rackscope dashboards push``)."""
