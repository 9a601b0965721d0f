"""rackscope: live throughput, power and tokens-per-joule telemetry for LLM inference racks.

This package holds what every part shares: the exception hierarchy, the metric contract,
clocks, the simulated-GPU model and the command-line entry point.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
