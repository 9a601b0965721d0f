"""Agent telemetry: GPU samples and workload metrics to Prometheus text (pull) and OTLP (push)."""

from rackscope.agent.telemetry.pipeline import Telemetry
from rackscope.agent.telemetry.series import NodeIdentity

__all__ = ["NodeIdentity", "Telemetry"]
