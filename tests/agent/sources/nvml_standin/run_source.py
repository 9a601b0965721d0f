"""Runs NvmlSource against whichever libnvidia-ml.so.1 this process loads and prints JSON.

The tests start it in a subprocess because the dynamic loader reads LD_LIBRARY_PATH only when
a process starts. Time between ticks is virtual (``--dt``), so integrated values are exact.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from rackscope.agent.sources.nvml import NvmlSource, probe
from rackscope.clock import VirtualClock
from rackscope.errors import SourceUnavailable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ticks", type=int, default=3, help="samples to take")
    parser.add_argument("--dt", type=float, default=1.0, help="virtual seconds between samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    out: dict[str, object] = {"probe": probe()}
    clock = VirtualClock()
    source = NvmlSource(clock=clock)
    try:
        infos = source.open()
    except SourceUnavailable as exc:
        out["error"] = {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}
        print(json.dumps(out))
        return 0
    out["gpus"] = [dataclasses.asdict(info) for info in infos]
    ticks = []
    for _ in range(args.ticks):
        clock.advance(args.dt)
        ticks.append([dataclasses.asdict(sample) for sample in source.sample()])
    source.close()
    out["ticks"] = ticks
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
