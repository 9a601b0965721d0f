"""Scenarios on the real simulated engine, on a virtual clock (and one on the wall clock)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rackscope import contract
from rackscope.clock import VirtualClock, WallClock
from rackscope.errors import ConfigError
from rackscope.runner import warmup
from rackscope.runner.config import PRESETS, RunConfig
from rackscope.runner.energy import SimEnergyMeter
from rackscope.runner.engines.sim import SimEngine
from rackscope.runner.progress import Progress
from rackscope.runner.runloop import run_scenario
from rackscope.simgpu import SimGpu, profile


class Sim:
    """A started simulated node on a virtual clock."""

    def __init__(self, gpu_model: str = "h100", gpus: int = 1, *, dropped: bool = False) -> None:
        self.clock = VirtualClock()
        self.gpus = [SimGpu(i, profile(gpu_model), self.clock) for i in range(gpus)]
        if dropped:
            for g in self.gpus:
                g.set_faults(dropped=True)
        self.engine = SimEngine(self.gpus, self.clock)
        self.energy = SimEnergyMeter(self.gpus, "n01")

    async def run(self, progress: Any = None, cancel: asyncio.Event | None = None, meter: Any = None,
                  **config: Any) -> Any:
        if not self.engine._started:
            await self.engine.start()
        cfg = RunConfig.from_dict({"engine": "sim", "node": "n01", "rack": "r1", **config})
        return await run_scenario(self.engine, cfg, clock=self.clock, energy=self.energy, progress=progress,
                                  cancel=cancel, meter=meter)


@pytest.mark.slow
async def test_offline_saturates_and_counts_what_the_engine_produced() -> None:
    sim = Sim("h100")
    max_batch = sim.engine.deployment(0).max_batch
    seen: list[tuple[int, int, int]] = []

    def progress(p: Progress) -> None:
        st = sim.engine.stats()
        seen.append((p.in_flight, st.running, st.queued))

    result = await sim.run(progress=progress, scenario="offline", duration_s=60.0, warmup_auto=False)
    s = result.summary
    # Everything goes out at once: the engine's batch is full and its queue never runs dry.
    assert all(running == max_batch and queued > 0 for _, running, queued in seen[1:-1])
    assert s["complete"] is True
    assert s["stop_reason"] == "duration"
    assert s["duration_s"] == pytest.approx(60.0)
    assert s["requests_cancelled"] > 0  # stopped at the deadline, their tokens counted
    # The record's tokens are what the engine generated, to within the one iteration that
    # may end after the deadline.
    produced = sim.engine.stats().output_tokens
    assert produced - max_batch <= s["output_tokens"] <= produced
    # A saturated H100 gives the published MLPerf figure (the ramp-up costs a little).
    published = profile("h100").llama2_70b_tokens_per_s
    assert s["output_tokens_per_s"] == pytest.approx(published, rel=0.04)
    assert s["output_tokens_per_s_per_gpu"] == s["output_tokens_per_s"]
    # Energy is the GPU's own integral over the window.
    assert s["energy_j"] == pytest.approx(sim.gpus[0].energy_j, rel=0.01)
    assert s["output_tokens_per_j"] == pytest.approx(s["output_tokens"] / s["energy_j"])


async def test_offline_with_requests_issues_all_and_waits_for_all() -> None:
    sim = Sim("h100")
    first: list[int] = []
    result = await sim.run(progress=lambda p: first.append(p.in_flight + p.requests_done) if not first else None,
                           scenario="offline", requests=300)
    s = result.summary
    assert first == [300]
    assert s["requests_completed"] == 300
    assert s["requests_cancelled"] == 0
    assert s["stop_reason"] == "requests"
    assert s["output_tokens"] == 300 * 294
    span = max(r.end_s or 0.0 for r in result.records) - min(r.start_s for r in result.records)
    assert s["duration_s"] == pytest.approx(span)


async def test_auto_warmup_leaves_the_ramp_out() -> None:
    sim = Sim("gb300")
    truth: dict[float, int] = {}
    phases: list[str] = []

    def progress(p: Progress) -> None:
        phases.append(p.phase)
        truth[sim.clock.now()] = sim.engine.stats().output_tokens

    result = await sim.run(progress=progress, scenario="offline", duration_s=20.0)
    s = result.summary
    window = result.phases[0]
    assert phases[0] == "warmup"
    assert phases[-1] == "measure"
    assert window.start_s >= 6.0  # two 3 s spans of rising output were left out
    assert window.carried  # requests in flight across the window's start count their tokens there
    assert s["duration_s"] == pytest.approx(20.0)
    # What the window counts is what the engine generated inside it, to within the one
    # iteration that may end after the deadline.
    produced = sim.engine.stats().output_tokens - truth[window.start_s]
    assert produced - sim.engine.deployment(0).max_batch <= s["output_tokens"] <= produced


async def test_concurrency_keeps_n_in_flight() -> None:
    sim = Sim("b200")
    seen: list[tuple[int, int]] = []

    def progress(p: Progress) -> None:
        st = sim.engine.stats()
        seen.append((p.in_flight, st.running + st.queued))

    result = await sim.run(progress=progress, scenario="concurrency", concurrency=16, requests=400)
    s = result.summary
    assert s["requests_completed"] == 400
    assert len(seen) > 5
    # Every sample while requests remained: exactly 16 in flight, as the engine sees it too.
    assert all(ours == theirs == 16 for ours, theirs in seen[:-3])
    assert s["tpot_s"]["p50"] is not None


async def test_poisson_arrivals_rate_and_seed() -> None:
    async def starts(seed: int) -> list[float]:
        sim = Sim("gb300", gpus=2)
        result = await sim.run(scenario="server", rate=40.0, requests=1500, seed=seed)
        assert result.summary["requests_completed"] == 1500
        return sorted(r.start_s for r in result.records)

    a = await starts(7)
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 40.0, rel=0.08)
    # Exponential gaps: standard deviation equals the mean.
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)
    assert a == await starts(7)
    assert a != await starts(8)


async def test_server_validity_flips_with_load_and_limits() -> None:
    light = await Sim("h100").run(scenario="server", rate=2.0, requests=60)
    s = light.summary
    assert (s["ttft_limit_s"], s["tpot_limit_s"]) == (2.0, 0.2)
    assert s["validity"] == "VALID"
    assert s["goodput_requests_per_s"] == pytest.approx(s["requests_per_s"])
    # An H100 serves ~10 requests/s of this shape: at 30/s the queue grows and TTFT with it.
    heavy = await Sim("h100").run(scenario="server", rate=30.0, requests=300)
    h = heavy.summary
    assert h["validity"] == "INVALID"
    assert h["ttft_s"]["p99"] > 2.0
    assert h["goodput_requests_per_s"] < h["requests_per_s"]
    tight = await Sim("h100").run(scenario="server", rate=2.0, requests=60, preset="interactive", ttft_limit_s=0.001)
    t = tight.summary
    assert t["validity"] == "INVALID"
    assert (t["ttft_limit_s"], t["tpot_limit_s"]) == (0.001, PRESETS["interactive"].tpot_s)
    assert t["goodput_requests_per_s"] == 0.0


async def test_warmup_requests_and_seconds_are_excluded() -> None:
    sim = Sim("b200")
    result = await sim.run(scenario="concurrency", concurrency=8, warmup_requests=20, requests=50, run_id="w")
    ids = {r.request_id for r in result.records}
    assert len(ids) == 50
    assert not ids & {f"w-{i}" for i in range(20)}
    assert ids == {f"w-{i}" for i in range(20, 70)}
    assert result.summary["requests_completed"] == 50

    sim = Sim("b200")
    result = await sim.run(scenario="server", rate=5.0, warmup_s=4.0, duration_s=6.0)
    window = result.phases[0]
    assert window.start_s == pytest.approx(4.0)
    assert all(r.start_s >= window.start_s for r in result.records)
    assert result.summary["duration_s"] == pytest.approx(6.0)


async def test_sweep_gives_one_point_each() -> None:
    sim = Sim("b200")
    result = await sim.run(scenario="sweep", sweep=[1, 4, 16], requests=40)
    points = result.to_record()["points"]
    assert [p["point"] for p in points] == [{"concurrency": 1}, {"concurrency": 4}, {"concurrency": 16}]
    rates = [p["summary"]["output_tokens_per_s"] for p in points]
    assert rates[0] < rates[1] < rates[2]
    assert all(p["summary"]["requests_completed"] == 40 for p in points)
    # The top-level summary is one named point (no limits: the fastest), never a mix of points;
    # what adds up across points is in the sweep's totals.
    assert result.summary["sweep"]["point"] == {"concurrency": 16}
    assert result.summary["output_tokens_per_s"] == rates[2]
    assert result.summary["requests_completed"] == 40
    assert result.summary["sweep"]["totals"]["requests_completed"] == 120
    rate_sweep = await Sim("b200").run(scenario="sweep", sweep_over="rate", sweep="2,4", requests=30)
    rp = rate_sweep.to_record()["points"]
    assert [p["point"] for p in rp] == [{"rate": 2.0}, {"rate": 4.0}]
    assert all(p["summary"]["validity"] == "VALID" for p in rp)


async def test_cancel_event_returns_a_partial_result() -> None:
    sim = Sim("b200")
    cancel = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.elapsed_s >= 5.0:
            cancel.set()

    result = await sim.run(progress=progress, cancel=cancel, scenario="concurrency", concurrency=8)  # unbounded
    s = result.summary
    assert s["complete"] is False
    assert s["stop_reason"] == "cancelled"
    assert s["requests_completed"] > 0
    assert s["requests_cancelled"] == 8  # the ones in flight
    assert sim.engine.stats().running == 0  # withdrawn from the engine


async def test_task_cancel_returns_a_partial_result() -> None:
    sim = Sim("b200")
    await sim.engine.start()
    task = asyncio.create_task(sim.run(scenario="concurrency", concurrency=4, requests=10_000))
    for _ in range(2000):
        await asyncio.sleep(0)
    task.cancel()
    result = await task
    assert result.summary["complete"] is False
    assert result.summary["stop_reason"] == "cancelled"
    assert 0 < result.summary["requests_completed"] < 10_000


async def test_repeated_errors_stop_the_run() -> None:
    sim = Sim("b200", dropped=True)
    result = await sim.run(scenario="concurrency", concurrency=4, requests=500, max_consecutive_errors=12)
    s = result.summary
    assert s["complete"] is False
    assert s["stop_reason"] == "errors"
    assert s["requests_failed"] == 12
    assert s["requests_failed_by_error"] == {"engine": 12}


async def test_workload_metrics_recorded_for_every_request() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    sim = Sim("b200", gpus=2)
    result = await sim.run(meter=provider.get_meter("t"), scenario="concurrency", concurrency=8, requests=60,
                           warmup_requests=10)
    data = reader.get_metrics_data()
    assert data is not None
    metrics: dict[str, Any] = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    out = sum(p.value for p in metrics[contract.TOKENS.otel_name].data.data_points
              if p.attributes["gen_ai.token.type"] == "output")
    assert out == 70 * 294  # warm-up included: the GPUs did that work
    gpus = {p.attributes["gpu"] for p in metrics[contract.REQUESTS.otel_name].data.data_points}
    assert gpus == {"0", "1"}
    # The window holds the 60 measured requests and, of the warm-up requests still running
    # when it opened, the tokens they generated after it opened (the simulated engine's count
    # at that moment is exact).
    window = result.phases[0]
    assert window.carried and all(before is not None for _, before in window.carried)
    carried = sum(r.output_tokens - before for r, before in window.carried)
    assert result.summary["output_tokens"] == round(60 * 294 + carried)
    assert 60 * 294 < result.summary["output_tokens"] < 70 * 294
    provider.shutdown()


@pytest.mark.slow
async def test_wall_clock_run() -> None:
    clock = WallClock()
    gpus = [SimGpu(0, profile("b200"), clock)]
    engine = SimEngine(gpus, clock)
    await engine.start()
    cfg = RunConfig.from_dict({"engine": "sim", "scenario": "concurrency", "concurrency": 4, "duration_s": 0.6,
                               "node": "n01", "output_len": 20})
    result = await run_scenario(engine, cfg, energy=SimEnergyMeter(gpus, "n01"))
    await engine.stop()
    s = result.summary
    assert s["duration_s"] == pytest.approx(0.6)
    assert s["requests_completed"] > 4
    assert s["energy_j"] > 0


def test_run_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown run setting"):
        RunConfig.from_dict({"scenerio": "offline"})
    with pytest.raises(ConfigError, match="needs a target rate"):
        RunConfig.from_dict({"scenario": "server"})
    with pytest.raises(ConfigError, match="needs concurrency"):
        RunConfig.from_dict({"scenario": "concurrency"})
    with pytest.raises(ConfigError, match="requests must be a whole number"):
        RunConfig.from_dict({"requests": "ten"})
    with pytest.raises(ConfigError, match="requests must be at least 1"):
        RunConfig.from_dict({"requests": 0})
    with pytest.raises(ConfigError, match="needs a server URL"):
        RunConfig.from_dict({"engine": "openai"})
    with pytest.raises(ConfigError, match="sweep concurrencies"):
        RunConfig.from_dict({"scenario": "sweep", "sweep": [1.5]})
    with pytest.raises(ConfigError, match="workers > 1 needs the openai engine"):
        RunConfig.from_dict({"workers": 2})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        RunConfig.from_dict([])  # type: ignore[arg-type]


def test_run_config_limits_and_round_trip() -> None:
    server = RunConfig.from_dict({"scenario": "server", "rate": 3})
    assert server.limits() == PRESETS["server"]
    assert RunConfig.from_dict({"scenario": "concurrency", "concurrency": 2}).limits() is None
    mixed = RunConfig.from_dict({"scenario": "server", "rate": 3, "preset": "interactive", "tpot_limit_s": 0.05})
    assert (mixed.limits().ttft_s, mixed.limits().tpot_s) == (0.45, 0.05)  # type: ignore[union-attr]
    cfg = RunConfig.from_dict({"engine": "openai", "url": "http://127.0.0.1:1", "api_key": "secret",
                               "duration_s": None, "sweep": "1,2"})
    d = cfg.to_dict()
    assert "api_key" not in d
    assert d["api_key_set"] is True
    assert "secret" not in repr(cfg)
    again = RunConfig.from_dict(d)
    assert again.to_dict() == {**d, "api_key_set": False}


@pytest.mark.slow
async def test_openai_engine_against_a_streaming_server() -> None:
    from rackscope.runner.engines.openai import OpenAIEngine
    from tests.runner.streaming_server import Behaviour, StreamingServer

    with StreamingServer(Behaviour(ttft_s=0.02, itl_s=0.004, models=["m"])) as server:
        engine = OpenAIEngine(server.base_url, "m")
        await engine.start()
        base = {"engine": "openai", "url": server.base_url, "model": "m", "node": "n01", "output_len": 12,
                "input_len": 20}
        # A requests bound: whole requests, token gaps from the engine's own record path.
        done = await run_scenario(engine, RunConfig.from_dict(
            {**base, "scenario": "concurrency", "concurrency": 4, "requests": 20}))
        s = done.summary
        assert s["requests_completed"] == 20
        assert s["output_tokens"] == 20 * 12
        assert s["itl_method"] == "token_gaps"
        assert s["itl_s"]["count"] == 20 * 11
        assert s["itl_s"]["p50"] == pytest.approx(0.004, abs=0.003)
        assert s["ttft_s"]["p50"] == pytest.approx(0.02, abs=0.015)
        assert done.environment["output_tokens_method"] == "usage"
        prompts = [r.body["prompt"] for r in server.requests if r.path == "/v1/completions"]
        assert len(prompts) == 20
        assert all(len(p.split()) == 20 for p in prompts)
        # A duration bound: streamed, and requests in flight at the end keep what arrived.
        cut = await run_scenario(engine, RunConfig.from_dict(
            {**base, "scenario": "concurrency", "concurrency": 4, "duration_s": 0.5, "output_len": 400}))
        c = cut.summary
        assert c["stop_reason"] == "duration"
        assert c["requests_cancelled"] == 4
        assert c["output_tokens"] > 0
        assert all(0 < r.output_tokens < 400 for r in cut.records if r.error_type == "cancelled")
        await engine.stop()


@pytest.mark.slow
def test_several_worker_processes() -> None:
    from rackscope.runner.multiprocess import run_with_workers
    from tests.runner.streaming_server import Behaviour, StreamingServer

    with StreamingServer(Behaviour(ttft_s=0.01, itl_s=0.002, models=["m"])) as server:
        cfg = RunConfig.from_dict({
            "engine": "openai", "url": server.base_url, "model": "m", "node": "n01", "scenario": "concurrency",
            "concurrency": 4, "requests": 24, "warmup_requests": 4, "workers": 2, "output_len": 8, "input_len": 5,
            "run_id": "wk",
        })
        result = run_with_workers(cfg)
    s = result.summary
    assert s["complete"] is True
    assert s["requests_completed"] == 24
    assert {r.request_id for r in result.records} == {f"wk-{i}" for i in range(4, 28)}
    assert s["output_tokens"] >= 24 * 8
    assert s["itl_method"] == "token_gaps"
    with pytest.raises(ConfigError, match="requests bound"):
        run_with_workers(cfg.replace(requests=None, duration_s=1.0))


async def test_auto_warmup_waits_for_the_generated_output_to_stop_climbing() -> None:
    # A simulated request reports only its first token and its end: the rule must judge the
    # tokens generated (the engine's own count here), not the first tokens of a cold start.
    sim = Sim("gb300", 2)
    generated: dict[float, int] = {}

    def progress(p: Progress) -> None:
        generated[sim.clock.now()] = sim.engine.stats().output_tokens

    result = await sim.run(progress=progress, scenario="offline", duration_s=2.0)
    start = result.phases[0].start_s
    times = sorted(t for t in generated if t <= start)
    span = warmup.AUTO_WARMUP_SPAN_S

    def settled(t_end: float) -> bool:
        def at(t: float) -> float:  # the sample nearest t (samples are about a second apart)
            return generated[min(times, key=lambda x: abs(x - t))]
        recent, before = at(t_end) - at(t_end - span), at(t_end - span) - at(t_end - 2 * span)
        return 0 < recent <= before * (1.0 + warmup.AUTO_WARMUP_GROWTH)

    assert times[-1] == pytest.approx(start)
    assert settled(start)
    # Every earlier sample with two spans behind it still saw the output climbing.
    assert not any(settled(t) for t in times[:-1] if t - times[0] >= 2 * span)


@pytest.mark.parametrize(("explicit", "opens_at"), [({"warmup_s": 2.5}, 2.5), ({"warmup_requests": 16}, 0.0)])
async def test_an_explicit_warmup_wins_over_the_automatic_rule(explicit: dict[str, Any], opens_at: float) -> None:
    auto = await Sim("gb300", 2).run(scenario="offline", duration_s=2.0)
    assert auto.phases[0].start_s > 2 * warmup.AUTO_WARMUP_SPAN_S  # what the automatic rule would have done
    sim = Sim("gb300", 2)
    result = await sim.run(scenario="offline", duration_s=2.0, **explicit)  # warmup_auto stays on
    # The loop notices the warm-up is over when it next wakes: within an engine iteration or so.
    assert opens_at <= result.phases[0].start_s < opens_at + 0.5
    assert result.summary["duration_s"] == pytest.approx(2.0)
