"""Benchmark scenarios (offline, server, concurrency, sweep) as the phases a run goes through.

Their settings are declared in ``runner.config``; the loop that drives them is ``runner.runloop``.

- ``offline``: every request issued at once, as MLPerf Offline's single query (a server
  gets at most ``offline_inflight``, default 1,024, connections at a time; the rest follow as
  others finish). Bounded by a duration only, the engine is kept saturated instead: its
  ``max_inflight`` hint (or 16,384) requests in flight, topped up as they finish.
- ``server``: Poisson arrivals at a target rate (seeded), open loop: an arrival never waits
  for an earlier request. TTFT/TPOT limits (MLPerf defaults, or the ``interactive`` preset)
  give goodput and a VALID/INVALID verdict on p99 TTFT and p99 TPOT.
- ``concurrency``: N requests in flight; a new one is issued as soon as one finishes.
- ``sweep``: one of the above per point of a list of concurrencies or rates.

A run stops at ``requests`` measured requests or ``duration_s`` seconds, whichever comes
first. At a duration's end the requests still in flight are stopped; the tokens they
received inside the window count towards throughput (that is what the engine produced),
but they count as neither completed nor failed (``requests_cancelled``). Warm-up requests
(or seconds) run first and are excluded from every result (``runner.warmup``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rackscope.runner.config import RunConfig
from rackscope.runner.datasets import Dataset, SyntheticDataset, load_dataset
from rackscope.runner.engines.registry import engine_spec

# Requests an offline run keeps in flight when the engine gives no ``max_inflight`` hint: for a
# server, more than a node batches at once (so its queue never runs dry) yet within a
# process's usual limit of open connections; for an in-process engine (queuing costs nothing)
# more than eight GPUs at TensorRT-LLM's largest batch.
DEFAULT_OFFLINE_INFLIGHT = 1024
DEFAULT_OFFLINE_INFLIGHT_IN_PROCESS = 16_384


@dataclass
class PhaseSpec:
    """One phase of a run: a whole scenario, or one point of a sweep."""

    kind: str  # offline, server, concurrency
    concurrency: int | None = None
    rate: float | None = None
    point: dict[str, float] | None = None
    label: str = "measure"


def phase_specs(config: RunConfig) -> list[PhaseSpec]:
    """The phases of the configured scenario, in order."""
    if config.scenario == "sweep":
        base = "server" if config.sweep_over == "rate" else "concurrency"
        specs = []
        for value in config.sweep:
            if base == "server":
                specs.append(PhaseSpec("server", rate=value, point={"rate": value}, label=f"rate={value:g}"))
            else:
                n = int(value)
                specs.append(
                    PhaseSpec("concurrency", concurrency=n, point={"concurrency": n}, label=f"concurrency={n}")
                )
        return specs
    return [PhaseSpec(config.scenario, concurrency=config.concurrency, rate=config.rate)]


def make_dataset(config: RunConfig, content: str | None = None) -> Dataset:
    """The configured dataset. ``content`` says what synthetic requests carry; by default what
    the engine's registration asks for (only lengths for the simulated engine, a text prompt
    for most others)."""
    if config.dataset:
        return load_dataset(config.dataset, config.dataset_format)
    return SyntheticDataset(
        input_len=config.input_len,
        output_len=config.output_len,
        distribution=config.length_dist,
        spread=config.length_spread,
        seed=config.seed,
        content=content or engine_spec(config.engine).prompt_content,
    )
