"""The engine registry: every engine by name, how to build it from a run's settings, its extra.

One registration per engine. From it come the ``engine`` setting's choices (and so
``rackscope run --engine`` and the checks of every run body; the agent's API schema lists the
engines registered when it loads), the engine ``rackscope run`` builds and the one the agent
builds. Engines are imported only when built, so a missing
optional engine costs nothing until asked for, and then fails with ``EngineUnavailable``
naming the extra to install::

    register(EngineSpec("mine", build_mine))

``build_mine(config, options)`` returns a ``BuiltEngine``; ``options`` (``EngineOptions``) is
what the host of the run hands over besides the ``RunConfig``: the agent's simulated GPUs and
clock, or ``rackscope run``'s engine flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

from rackscope.errors import ConfigError, EngineUnavailable
from rackscope.runner.datasets import CONTENTS
from rackscope.urls import redact_in

if TYPE_CHECKING:
    from rackscope.clock import Clock, VirtualClock
    from rackscope.runner.config import RunConfig
    from rackscope.runner.energy import EnergyMeter
    from rackscope.runner.engines.base import Engine, Request
    from rackscope.simgpu import SimGpu

# What the simulated engine runs on when the settings do not say.
DEFAULT_SIM_GPUS = 4
DEFAULT_SIM_MODEL = "gb300"
# An engine name is a setting value, a metric attribute and part of messages.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class EngineOptions:
    """What the host of a run hands an engine besides the run's settings."""

    clock: Clock | None = None  # sim: the clock its GPUs run on (default: a new wall or virtual clock)
    gpus: list[SimGpu] | None = None  # sim: the node's own simulated GPUs (the agent's); default: from the settings
    virtual_clock: bool = False  # sim: run on virtual time that the run loop moves (--virtual-clock)
    sim_variation: bool = False  # sim: the seeded per-node variation (--sim-variation)
    engine_slowdown: float = 1.0  # sim: the node's engine-slow fault at the start
    tp: int = 1  # trtllm, trtllm-bench: tensor parallelism
    device: str = "cpu"  # hf: torch device
    dtype: str = "auto"  # hf: torch dtype


@dataclass
class BuiltEngine:
    """An engine ready to start, and what the run loop needs beside it."""

    engine: Engine
    energy: EnergyMeter | None = None  # the energy of the GPUs it runs on, when it made them
    clock: VirtualClock | None = None  # the virtual clock the run loop moves (only one the engine made)


class WholeBenchmark(Protocol):
    """A tool that runs the whole benchmark itself (trtllm-bench): our requests go in, its
    summary of the run comes out."""

    def run(self, requests: Sequence[Request], workdir: Path) -> dict[str, Any]: ...


EngineFactory = Callable[["RunConfig", EngineOptions], BuiltEngine]
BenchFactory = Callable[["RunConfig", EngineOptions], WholeBenchmark]


@dataclass(frozen=True)
class EngineSpec:
    """One engine. ``factory`` builds a streaming ``Engine``; an engine that runs the whole
    benchmark itself gives ``bench`` instead (exactly one of the two)."""

    name: str
    factory: EngineFactory | None = None
    bench: BenchFactory | None = None
    extra: str | None = None  # the pip extra it needs, named when it is missing
    needs_checkpoint: bool = False  # ``model`` names a checkpoint (path or hub id): no default
    default_model: str = ""  # when the settings name none ("": the engine finds out)
    simulated: bool = False  # runs on simulated GPUs; its records say ``simulated``
    prompt_content: str = "text"  # what synthetic requests carry for it (runner.datasets.CONTENTS)

    def __post_init__(self) -> None:
        if NAME_PATTERN.fullmatch(self.name) is None:
            raise ValueError(f"engine name must match {NAME_PATTERN.pattern}, not {self.name!r}")
        if (self.factory is None) == (self.bench is None):
            raise ValueError(f"engine {self.name!r} needs a factory or a bench runner (one of them)")
        if self.prompt_content not in CONTENTS:
            raise ValueError(f"prompt_content must be one of {', '.join(CONTENTS)}")

    @property
    def streaming(self) -> bool:
        """A streaming engine the run loop drives (else a tool that runs the benchmark itself)."""
        return self.factory is not None


_ENGINES: dict[str, EngineSpec] = {}


class EngineNames(Sequence[str]):
    """The registered engine names in registration order, live: an engine registered later is
    in it too (the ``engine`` setting's choices are this view)."""

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return tuple(_ENGINES)[index]

    def __len__(self) -> int:
        return len(_ENGINES)

    def __contains__(self, value: object) -> bool:
        return value in _ENGINES

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_ENGINES))

    def __eq__(self, other: object) -> bool:
        # Equal to a tuple or list of the same names: it stands in for a tuple of choices.
        if isinstance(other, EngineNames | tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(_ENGINES))

    def __repr__(self) -> str:
        return f"EngineNames({tuple(_ENGINES)!r})"


ENGINE_NAMES = EngineNames()


def register(spec: EngineSpec) -> EngineSpec:
    """Add an engine; its name becomes a choice of the ``engine`` setting."""
    if spec.name in _ENGINES:
        raise ValueError(f"engine {spec.name!r} is already registered")
    _ENGINES[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an engine (tests that register one of their own put things back)."""
    _ENGINES.pop(name, None)


def engine_spec(name: str) -> EngineSpec:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name[:40]!r}; choose one of {', '.join(_ENGINES)}") from None


def is_simulated(name: str) -> bool:
    """True for an engine on simulated GPUs (its records say so); False for any other name."""
    spec = _ENGINES.get(name)
    return spec is not None and spec.simulated


def build_engine(config: RunConfig, options: EngineOptions | None = None) -> BuiltEngine:
    """The streaming engine ``config.engine`` names, not started yet."""
    spec = engine_spec(config.engine)
    if spec.factory is None:
        raise ConfigError(f"engine {spec.name!r} runs the whole benchmark itself; it is not a streaming engine")
    return spec.factory(config, options or EngineOptions())


def build_bench(config: RunConfig, options: EngineOptions | None = None) -> WholeBenchmark:
    """The whole-benchmark tool ``config.engine`` names."""
    spec = engine_spec(config.engine)
    if spec.bench is None:
        raise ConfigError(f"engine {spec.name!r} is a streaming engine, not a whole-benchmark tool")
    return spec.bench(config, options or EngineOptions())


def worker_engine(config: RunConfig) -> Engine:
    """The engine of one worker process (``runner.workers``): built there from the settings alone."""
    return build_engine(config).engine


def _unavailable(name: str, exc: ModuleNotFoundError) -> EngineUnavailable:
    extra = _ENGINES[name].extra
    hint = f"pip install 'rackscope[{extra}]'" if extra else "reinstall rackscope"
    return EngineUnavailable(f"--engine {name} is not available in this build ({exc.name} is missing); hint: {hint}")


# --- the engines rackscope ships ---------------------------------------------------------------
def _sim(config: RunConfig, options: EngineOptions) -> BuiltEngine:
    from rackscope.clock import VirtualClock, WallClock
    from rackscope.runner.energy import SimEnergyMeter
    from rackscope.runner.engines.sim import SimEngine
    from rackscope.simgpu import SimGpu, make_node_gpus, profile

    clock = options.clock or (VirtualClock() if options.virtual_clock else WallClock())
    if options.virtual_clock and not isinstance(clock, VirtualClock):
        raise ConfigError("virtual time needs a VirtualClock")
    gpus = options.gpus
    if gpus is None:
        gpu_model = config.gpu_model or DEFAULT_SIM_MODEL
        count = config.gpus or DEFAULT_SIM_GPUS
        try:
            prof = profile(gpu_model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if options.sim_variation:
            gpus = make_node_gpus(gpu_model, count, clock, rack=config.rack, node=config.node, seed=config.seed)
        else:
            gpus = [SimGpu(i, prof, clock) for i in range(count)]
    engine = SimEngine(gpus, clock, model=config.model, engine_slowdown=options.engine_slowdown,
                       warm_start=config.sim_warm_start, seed=config.seed)
    # Only a clock made here is the run loop's to move; the agent's belongs to the agent.
    virtual = clock if options.virtual_clock and isinstance(clock, VirtualClock) else None
    return BuiltEngine(engine, SimEnergyMeter(gpus, config.node), virtual)


def _openai(config: RunConfig, options: EngineOptions) -> BuiltEngine:
    from rackscope.runner.engines.openai import OpenAIEngine

    if config.url is None:
        raise ConfigError("the openai engine needs a server URL (url / --url)")
    try:
        engine = OpenAIEngine(
            config.url, config.model, "chat" if config.api == "chat" else "completions", config.api_key,
            timeout_s=config.request_timeout_s, request_deadline_s=config.request_deadline_s,
        )
    except ValueError as exc:
        raise ConfigError(redact_in(str(exc), config.url)) from exc
    return BuiltEngine(engine)


def _trtllm(config: RunConfig, options: EngineOptions) -> BuiltEngine:
    try:
        from rackscope.runner.engines.trtllm import TrtllmEngine
    except ModuleNotFoundError as exc:
        raise _unavailable("trtllm", exc) from exc
    try:
        return BuiltEngine(TrtllmEngine(config.model, tp=options.tp))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _hf(config: RunConfig, options: EngineOptions) -> BuiltEngine:
    try:
        from rackscope.runner.engines.hf import HfEngine
    except ModuleNotFoundError as exc:
        raise _unavailable("hf", exc) from exc
    try:
        return BuiltEngine(HfEngine(config.model, device=options.device, dtype=options.dtype))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _trtllm_bench(config: RunConfig, options: EngineOptions) -> WholeBenchmark:
    try:
        from rackscope.runner.engines.trtllm_bench import TrtllmBenchRunner
    except ModuleNotFoundError as exc:
        raise _unavailable("trtllm-bench", exc) from exc
    try:
        return TrtllmBenchRunner(
            config.model, tp=options.tp, concurrency=config.concurrency if config.scenario == "concurrency" else None
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# Built in: simulated Llama2-70B on simulated GPUs; an OpenAI-compatible server (trtllm-serve,
# vLLM, SGLang, NIM); TensorRT-LLM's LLM API in process; NVIDIA's trtllm-bench run as a tool;
# a Hugging Face causal LM with PyTorch in process.
register(EngineSpec("sim", _sim, default_model="llama2-70b", simulated=True, prompt_content="lengths"))
register(EngineSpec("openai", _openai))
register(EngineSpec("trtllm", _trtllm, extra="trtllm", needs_checkpoint=True))
register(EngineSpec("trtllm-bench", bench=_trtllm_bench, extra="trtllm", needs_checkpoint=True, prompt_content="ids"))
register(EngineSpec("hf", _hf, extra="torch", needs_checkpoint=True))

__all__ = [
    "DEFAULT_SIM_GPUS",
    "DEFAULT_SIM_MODEL",
    "ENGINE_NAMES",
    "BuiltEngine",
    "EngineFactory",
    "EngineOptions",
    "EngineSpec",
    "WholeBenchmark",
    "build_bench",
    "build_engine",
    "engine_spec",
    "is_simulated",
    "register",
    "unregister",
    "worker_engine",
]
