"""The engine registry: one registration per engine feeds the settings, ``rackscope run`` and the
agent; capabilities are what each engine class declares."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rackscope.cli import main
from rackscope.clock import WallClock
from rackscope.errors import ConfigError, EngineUnavailable
from rackscope.runner.config import SETTINGS, RunConfig
from rackscope.runner.engines.base import (
    CAPABILITIES,
    CountsLiveTokens,
    Done,
    Engine,
    EngineEvent,
    FirstToken,
    HasGpus,
    HintsInflight,
    Prewarms,
    RecordsWholeRequests,
    ReportsIterationStats,
    ReportsStats,
    Request,
    Slowable,
    SubmitsCallbacks,
    VirtualTime,
)
from rackscope.runner.engines.hf import HfEngine
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.engines.registry import (
    ENGINE_NAMES,
    BuiltEngine,
    EngineOptions,
    EngineSpec,
    build_bench,
    build_engine,
    engine_spec,
    register,
    unregister,
)
from rackscope.runner.engines.sim import SimEngine
from rackscope.runner.engines.trtllm import TrtllmEngine
from rackscope.runner.engines.trtllm_bench import TrtllmBenchRunner
from rackscope.runner.results.io import load_run
from rackscope.runner.runloop import run_scenario
from rackscope.simgpu import SimGpu, profile


def run_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def engine_choices_in_help(text: str) -> list[str]:
    found = re.search(r"--engine \{([^}]*)\}", text)
    assert found is not None, text
    return found.group(1).split(",")


# --- a tiny engine, as a user would add one ----------------------------------------------------
class TinyEngine:
    """Answers every request at once with all its tokens: the least an ``Engine`` can be."""

    name = "tiny"

    def __init__(self, model: str) -> None:
        self.model = model or "tiny-model"
        self._clock = WallClock()
        self.served = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def now(self) -> float:
        return self._clock.now()

    async def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        t = self.now()
        self.served += 1
        yield FirstToken(t)
        yield Done(t, input_tokens=request.input_tokens, output_tokens=request.max_output_tokens)


def build_tiny(config: RunConfig, options: EngineOptions) -> BuiltEngine:
    return BuiltEngine(TinyEngine(config.model))


@pytest.fixture
def tiny() -> Iterator[EngineSpec]:
    spec = register(EngineSpec("tiny", build_tiny))
    try:
        yield spec
    finally:
        unregister("tiny")


# --- the registry feeds the settings and the CLI -------------------------------------------------
def test_every_registered_engine_is_a_setting_choice_and_in_run_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(ENGINE_NAMES) == ["sim", "openai", "trtllm", "trtllm-bench", "hf"]
    assert list(SETTINGS["engine"].choices or ()) == list(ENGINE_NAMES)
    assert engine_choices_in_help(run_help(capsys)) == list(ENGINE_NAMES)
    for name in ENGINE_NAMES:
        spec = engine_spec(name)
        assert spec.name == name
        assert spec.streaming == (spec.factory is not None)


def test_adding_an_engine_is_one_registration(tiny: EngineSpec, capsys: pytest.CaptureFixture[str]) -> None:
    assert "tiny" in ENGINE_NAMES
    assert "tiny" in (SETTINGS["engine"].choices or ())
    assert "tiny" in engine_choices_in_help(run_help(capsys))
    config = RunConfig.from_dict({"engine": "tiny", "model": "", "requests": 3})
    assert config.engine == "tiny"
    unregister("tiny")
    with pytest.raises(ConfigError, match="engine must be one of"):
        RunConfig.from_dict({"engine": "tiny", "requests": 3})
    register(tiny)


async def test_a_registered_engine_runs_through_the_runner_api(tiny: EngineSpec) -> None:
    config = RunConfig.from_dict({
        "engine": "tiny", "model": "", "scenario": "concurrency", "concurrency": 4, "requests": 20,
        "warmup_requests": 2, "output_len": 16, "node": "n01", "run_id": "tiny-run",
    })
    built = build_engine(config)
    engine = built.engine
    assert isinstance(engine, TinyEngine)
    assert isinstance(engine, Engine)
    assert (built.energy, built.clock) == (None, None)
    await engine.start()
    try:
        result = await run_scenario(engine, config, clock=built.clock, energy=built.energy)
    finally:
        await engine.stop()
    s = result.summary
    assert s["complete"] is True
    assert s["requests_completed"] == 20
    assert s["output_tokens"] == 20 * 16
    assert engine.served == 22  # the warm-up too
    assert result.environment["engine"] == "tiny"
    assert result.environment["model"] == "tiny-model"
    assert result.environment["simulated"] is False


def test_a_registered_engine_runs_through_rackscope_run(tiny: EngineSpec, tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    code = main(["run", "--engine", "tiny", "--scenario", "concurrency", "--concurrency", "2", "--requests", "5",
                 "--output", str(out)])
    assert code == 0
    record = load_run(out)
    assert record["environment"]["engine"] == "tiny"
    assert record["config"]["model"] == "tiny-model"
    assert record["summary"]["requests_completed"] == 5
    assert json.loads(out.read_text())["config"]["engine"] == "tiny"


def test_engine_names_are_checked() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(EngineSpec("sim", build_tiny))
    with pytest.raises(ValueError, match="engine name"):
        EngineSpec("Not A Name", build_tiny)
    with pytest.raises(ValueError, match="one of them"):
        EngineSpec("neither")
    with pytest.raises(ConfigError, match="unknown engine 'nope'; choose one of sim, openai"):
        engine_spec("nope")


# --- what the built-in registrations build -----------------------------------------------------
def test_builtin_registrations_build_their_engines() -> None:
    sim = build_engine(RunConfig.from_dict({"engine": "sim", "gpus": 2, "gpu_model": "h200", "requests": 1}),
                       EngineOptions(virtual_clock=True))
    assert isinstance(sim.engine, SimEngine)
    assert [g.profile.key for g in sim.engine.gpus] == ["h200", "h200"]
    assert sim.clock is not None and sim.energy is not None
    # The agent hands over its own GPUs and clock: the loop must not move that clock.
    node_clock = WallClock()
    own = [SimGpu(0, profile("b200"), node_clock)]
    hosted = build_engine(RunConfig.from_dict({"engine": "sim", "requests": 1}),
                          EngineOptions(gpus=own, clock=node_clock, engine_slowdown=2.0))
    assert isinstance(hosted.engine, SimEngine)
    assert hosted.engine.gpus == own
    assert (hosted.engine.engine_slowdown, hosted.clock) == (2.0, None)

    openai = build_engine(RunConfig.from_dict({"engine": "openai", "url": "http://127.0.0.1:1", "model": "m",
                                               "requests": 1}))
    assert isinstance(openai.engine, OpenAIEngine)
    trtllm = build_engine(RunConfig.from_dict({"engine": "trtllm", "model": "m", "requests": 1}), EngineOptions(tp=2))
    assert isinstance(trtllm.engine, TrtllmEngine)
    assert trtllm.engine.tp == 2
    hf = build_engine(RunConfig.from_dict({"engine": "hf", "model": "m", "requests": 1}),
                      EngineOptions(dtype="float16"))
    assert isinstance(hf.engine, HfEngine)
    assert hf.engine.dtype == "float16"

    bench_config = RunConfig.from_dict({"engine": "trtllm-bench", "model": "m", "requests": 1,
                                        "scenario": "concurrency", "concurrency": 8})
    bench = build_bench(bench_config, EngineOptions(tp=4))
    assert isinstance(bench, TrtllmBenchRunner)
    assert (bench.tp, bench.concurrency) == (4, 8)
    with pytest.raises(ConfigError, match="not a streaming engine"):
        build_engine(bench_config)
    with pytest.raises(ConfigError, match="not a whole-benchmark tool"):
        build_bench(RunConfig.from_dict({"engine": "sim", "requests": 1}))


def test_bad_engine_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="tp must be at least 1"):
        build_engine(RunConfig.from_dict({"engine": "trtllm", "model": "m", "requests": 1}), EngineOptions(tp=0))
    with pytest.raises(ConfigError, match="device must be"):
        build_engine(RunConfig.from_dict({"engine": "hf", "model": "m", "requests": 1}), EngineOptions(device="tpu"))
    with pytest.raises(ConfigError, match="unknown GPU model"):
        build_engine(RunConfig.from_dict({"engine": "sim", "gpu_model": "v100", "requests": 1}))


def test_an_engine_missing_from_the_build_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in an install without the module: importing it fails.
    monkeypatch.setitem(sys.modules, "rackscope.runner.engines.hf", None)
    with pytest.raises(EngineUnavailable, match=r"--engine hf is not available .*pip install 'rackscope\[torch\]'"):
        build_engine(RunConfig.from_dict({"engine": "hf", "model": "m", "requests": 1}))


# --- capabilities ---------------------------------------------------------------------------------
def engines() -> dict[str, object]:
    clock = WallClock()
    return {
        "sim": SimEngine([SimGpu(0, profile("h100"), clock)], clock),
        "openai": OpenAIEngine("http://127.0.0.1:1", "m"),
        "trtllm": TrtllmEngine("m"),
        "hf": HfEngine("m"),
    }


EXPECTED = {
    "sim": {SubmitsCallbacks, CountsLiveTokens, VirtualTime, ReportsStats, HintsInflight, Slowable, HasGpus},
    "openai": {RecordsWholeRequests, CountsLiveTokens, Prewarms},
    "trtllm": {ReportsIterationStats},
    "hf": set(),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capability_checks_match_what_each_engine_declares(name: str) -> None:
    engine = engines()[name]
    assert isinstance(engine, Engine)
    found = {cap for cap in CAPABILITIES if isinstance(engine, cap)}
    assert found == EXPECTED[name]
    declared = {cap for cap in CAPABILITIES if cap in type(engine).__mro__}
    # An engine class names what it can do among its bases; one that names nothing (an engine
    # kept elsewhere) is still served for what it implements.
    assert declared in (found, set())


def test_the_tiny_engine_declares_nothing_and_gets_the_plain_streaming_path() -> None:
    engine = TinyEngine("m")
    assert isinstance(engine, Engine)
    assert not any(isinstance(engine, cap) for cap in CAPABILITIES)
