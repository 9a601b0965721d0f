"""An inference server's own metrics page, read onto one small contract.

- ``formats``: one reader per server format (vLLM, SGLang, TensorRT-LLM) and detection;
- ``scraper``: the bounded periodic read and the snapshot that withholds stale values;
- ``history``: a run's readings over time, reset-aware, summed up over any stretch of it.

The agent exports what the scraper reads (``rackscope.agent.engine_metrics``); a benchmark
run records what its server counted beside what its client counted (``rackscope.runner``).
"""

from rackscope.engine_metrics.formats import FORMATS, EngineFormat, Histogram, ModelReading, Reading, read_page
from rackscope.engine_metrics.history import ReadingHistory
from rackscope.engine_metrics.scraper import EngineScraper, EngineSnapshot, ScrapeStatus, metrics_url

__all__ = [
    "FORMATS",
    "EngineFormat",
    "EngineScraper",
    "EngineSnapshot",
    "Histogram",
    "ModelReading",
    "Reading",
    "ReadingHistory",
    "ScrapeStatus",
    "metrics_url",
    "read_page",
]
