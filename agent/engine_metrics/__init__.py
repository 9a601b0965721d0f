"""The agent's side of the inference engine's own view: its metrics page (read by
``rackscope.engine_metrics``) exported on the contract's names.

- ``instruments``: the snapshot as OpenTelemetry instruments with the contract's names, and the
  server's own latency histograms as a source of the agent's pre-aggregated histograms;
- ``host``: the agent's one set of instruments and the scraper behind them (configured, or
  following a run against a server).
"""

from rackscope.agent.engine_metrics.instruments import ENGINE_SCOPE, EngineHistograms, EngineInstruments

__all__ = ["ENGINE_SCOPE", "EngineHistograms", "EngineInstruments"]
