"""What a run measured, as a ``RunResult``: its phases with the run's identity and environment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rackscope.runner.engines.base import Engine, HasGpus
from rackscope.runner.engines.registry import is_simulated
from rackscope.runner.results.record import RunResult, environment, now_utc

if TYPE_CHECKING:
    from datetime import datetime

    from rackscope.runner.config import RunConfig
    from rackscope.runner.datasets import Dataset
    from rackscope.runner.results.window import Phase


def build_result(
    config: RunConfig,
    phases: list[Phase],
    *,
    engine: str,
    model: str,
    dataset: Dataset,
    started_at: datetime,
    gpu_models: list[str],
    gpus: int | None,
) -> RunResult:
    """A ``RunResult`` around measured phases (``config.run_id`` must be set)."""
    assert config.run_id is not None
    env = environment(
        engine=engine,
        model=model,
        gpu_models=gpu_models,
        records=(r for p in phases for r in p.records),
        extra={"simulated": is_simulated(engine), "dataset": dataset.describe()},
    )
    return RunResult(
        run_id=config.run_id,
        config=config.to_dict(),
        environment=env,
        started_at=started_at,
        ended_at=now_utc(),
        phases=phases,
        node=config.node,
        gpus=gpus,
        limits=config.limits(),
        sweep=config.scenario == "sweep",
    )


def engine_gpu_models(engine: Engine, config: RunConfig) -> list[str]:
    """The GPU models a record names: those the engine runs on when it knows them, else the
    ``gpu_model`` label the run was given."""
    if isinstance(engine, HasGpus) and engine.gpus:
        return sorted({g.profile.name for g in engine.gpus})
    return [config.gpu_model] if config.gpu_model else []
