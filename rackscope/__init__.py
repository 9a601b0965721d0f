"""rackscope: live throughput, power and tokens-per-joule telemetry for LLM inference racks.

The one installed namespace. Its own modules are what every part shares: the exception
hierarchy (errors), the metric contract, clocks, the simulated-GPU model (simgpu), bounded reads
from peers (peers), URL redaction (urls), the escaping log formatter (logs), atomic file I/O
(fileio), the JSON type (jsontypes) and the command-line entry point (cli). The rooms
``rackscope.agent``, ``.runner``, ``.rack`` and ``.dashboards`` are the repository's top-level
folders, reached through links (see the README's design notes).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
