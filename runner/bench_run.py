"""``rackscope run`` with a tool that runs the whole benchmark itself (``--engine trtllm-bench``).

Our requests go in as its dataset; its report becomes the run record's summary."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError
from rackscope.runner.engines.registry import build_bench
from rackscope.runner.finish import check_output

if TYPE_CHECKING:
    from rackscope.runner.config import RunConfig
    from rackscope.runner.driver import RunOptions


def run_bench(config: RunConfig, options: RunOptions) -> int:
    """Run the tool over the configured requests and write its record; returns the exit status."""
    from rackscope.fileio import write_json
    from rackscope.runner.driver import load_run_dataset
    from rackscope.runner.results.record import environment, now_utc, utc_iso

    bench = build_bench(config, options.engine)
    if config.scenario not in ("offline", "concurrency"):
        raise ConfigError(f"--engine {config.engine} runs the offline or concurrency scenario only")
    if config.duration_s is not None:
        raise ConfigError(f"--engine {config.engine} takes --requests, not --duration")
    if options.output is not None:
        check_output(options.output)
    dataset = load_run_dataset(config, options)
    count = config.requests or len(dataset)
    requests = [dataset.request(i, str(i)) for i in range(count)]
    started = now_utc()
    if options.workdir is not None:
        summary = bench.run(requests, options.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix=f"rackscope-{config.engine}-") as tmp:
            summary = bench.run(requests, Path(tmp))
    record = trtllm_bench_record(summary, config, started_iso=utc_iso(started), ended_iso=utc_iso(now_utc()),
                                 env=environment(engine=config.engine, model=config.model,
                                                 gpu_models=[config.gpu_model] if config.gpu_model else [],
                                                 records=[], extra={"simulated": False}))
    if options.output is not None:
        write_json(options.output, record)
    print(f"output tokens/s: {summary.get('output_tokens_per_s')}")
    return 0


def trtllm_bench_record(
    summary: dict[str, Any], config: RunConfig, *, started_iso: str, ended_iso: str, env: dict[str, Any]
) -> dict[str, Any]:
    """A ``rackscope.run/1`` record around a trtllm-bench summary (no per-request rows)."""
    from rackscope.runner.results.record import SCHEMA
    from rackscope.runner.results.stats import distribution

    empty = distribution([])
    s = dict(summary)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        s[key] = s.get(key) or dict(empty)
    s["itl_s"] = dict(s["tpot_s"])
    s["itl_method"] = "tpot"
    s.setdefault("complete", True)
    s.setdefault("stop_reason", "requests")
    s.setdefault("requests_failed", 0)
    s.setdefault("requests_failed_by_error", {})
    s.setdefault("requests_cancelled", 0)
    s.setdefault("gpus", config.gpus)
    s.setdefault("energy_j", None)
    s.setdefault("output_tokens_per_j", None)
    env = {**env, "output_tokens_method": "engine", "trtllm_bench": s.pop("trtllm_bench", None)}
    return {
        "schema": SCHEMA, "run_id": config.run_id, "started_at": started_iso, "ended_at": ended_iso, "error": None,
        "config": config.to_dict(), "environment": env, "summary": s, "per_gpu": [], "per_node": [],
        "timeseries": None, "points": [], "requests_file": None,
    }
