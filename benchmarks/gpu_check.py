"""Checks the NVML source on a real GPU node: samples once a second under a matmul load.

Usage: python benchmarks/gpu_check.py [--seconds 20] [--no-load]

Prints one row per GPU per second (power, energy since start, memory, utilization, SM clock,
temperature, clock-event reasons, NVLink bytes), then per GPU the average power from the
energy counter next to the mean of the power readings. Exits 1 if any GPU's energy did not
increase, 2 if NVML or (without --no-load) torch with CUDA is not available.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

from rackscope.agent.sources.base import GpuSample, throttle_names
from rackscope.agent.sources.nvml import NvmlSource, probe
from rackscope.errors import SourceUnavailable

MATMUL_SIZE = 8192  # bf16 8192^3 matmuls keep an H100-class GPU near its power limit


def start_load(stop: threading.Event) -> list[threading.Thread] | str:
    """One matmul loop per visible CUDA device; a reason string when there is no torch+CUDA."""
    try:
        import torch
    except ImportError:
        return "this check needs torch with CUDA to load the GPUs (pip install torch), or use --no-load"
    if not torch.cuda.is_available():
        return "torch is installed but sees no CUDA device; use --no-load to sample an idle GPU"

    def work(device: int) -> None:
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=f"cuda:{device}", dtype=torch.bfloat16)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=f"cuda:{device}", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(10):
                a @ b
            torch.cuda.synchronize(device)

    threads = [threading.Thread(target=work, args=(d,), daemon=True) for d in range(torch.cuda.device_count())]
    for thread in threads:
        thread.start()
    return threads


def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def row(elapsed_s: float, s: GpuSample) -> str:
    if not s.ok:
        return f"{elapsed_s:5.1f} {s.index:>3}  FAILED: {s.error}"
    throttle = ",".join(throttle_names(s.throttle_reasons)) if s.throttle_reasons else "-"
    return (
        f"{elapsed_s:5.1f} {s.index:>3} {fmt(s.power_w, '8.1f')} {fmt(s.energy_j, '10.1f')} {s.energy_method[:5]:>5}"
        f" {fmt(s.memory_used_bytes, '8.2f', 2**-30)} {fmt(s.utilization, '5.0f', 100)}"
        f" {fmt(s.sm_clock_mhz, '6.0f')} {fmt(s.temperature_c, '5.0f')}"
        f" {fmt(s.nvlink_tx_bytes, '9.1f', 1e-6)} {fmt(s.nvlink_rx_bytes, '9.1f', 1e-6)}  {throttle}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to sample")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--no-load", action="store_true", help="sample without starting a GPU load")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    reason = probe()
    if reason is not None:
        print(f"NVML not usable: {reason}", file=sys.stderr)
        return 2
    stop = threading.Event()
    if not args.no_load:
        load = start_load(stop)
        if isinstance(load, str):
            print(load, file=sys.stderr)
            return 2
        print(f"load: bf16 {MATMUL_SIZE}^3 matmuls on {len(load)} CUDA device(s)")

    source = NvmlSource()
    try:
        infos = source.open()
    except SourceUnavailable as exc:
        print(f"NVML source did not open: {exc}", file=sys.stderr)
        return 2
    for info in infos:
        print(f"GPU {info.index}: {info.model} {info.uuid}, limit {info.power_limit_w} W, {info.memory_total_bytes} B")
    print("    t gpu  power_W   energy_J method mem_GiB util%  SM_MHz temp_C nvl_tx_MB nvl_rx_MB  clock events")
    history: dict[int, list[GpuSample]] = {info.index: [] for info in infos}
    start_s = time.monotonic()
    try:
        while (elapsed_s := time.monotonic() - start_s) < args.seconds:
            for sample in source.sample():
                history[sample.index].append(sample)
                print(row(elapsed_s, sample))
            time.sleep(args.interval)
    finally:
        stop.set()
        source.close()

    failed = False
    for index, samples in history.items():
        good = [s for s in samples if s.ok and s.energy_j is not None]
        if len(good) < 2 or good[-1].energy_j is None or good[0].energy_j is None:
            print(f"GPU {index}: FAIL: fewer than two energy readings")
            failed = True
            continue
        energy_j = good[-1].energy_j - good[0].energy_j
        span_s = good[-1].timestamp_s - good[0].timestamp_s
        powers = [s.power_w for s in good if s.power_w is not None]
        mean_power_w = sum(powers) / len(powers) if powers else float("nan")
        verdict = "ok" if energy_j > 0 else "FAIL: energy did not increase"
        print(
            f"GPU {index}: {energy_j:.1f} J over {span_s:.1f} s = {energy_j / span_s:.1f} W from energy"
            f" ({good[-1].energy_method}); mean power reading {mean_power_w:.1f} W"
            f" (ratio {energy_j / span_s / mean_power_w:.3f}): {verdict}"
        )
        failed |= energy_j <= 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
