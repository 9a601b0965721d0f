"""The inference engine's own view: its metrics page scraped, read onto one contract, exported.

- ``formats``: one reader per server format (vLLM, SGLang, TensorRT-LLM) and detection;
- ``scraper``: the bounded periodic read and the snapshot that withholds stale values;
- ``instruments``: the snapshot as OpenTelemetry instruments with the contract's names;
- ``host``: the agent's one set of instruments and the scraper behind them (configured, or
  following a run against a server).
"""

from rackscope.agent.engine_metrics.formats import FORMATS, EngineFormat, ModelReading, Reading, read_page
from rackscope.agent.engine_metrics.instruments import ENGINE_SCOPE, EngineInstruments
from rackscope.agent.engine_metrics.scraper import EngineScraper, EngineSnapshot, ScrapeStatus, metrics_url

__all__ = [
    "ENGINE_SCOPE",
    "FORMATS",
    "EngineFormat",
    "EngineInstruments",
    "EngineScraper",
    "EngineSnapshot",
    "ModelReading",
    "Reading",
    "ScrapeStatus",
    "metrics_url",
    "read_page",
]
