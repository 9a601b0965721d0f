"""The end of a ``rackscope run``: the terminal summary, the record written and the exit status.

The record is written even for a partial run (stopped early, or by a signal)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError, ResultError

if TYPE_CHECKING:
    from rackscope.runner.results.record import RunResult

EXIT_INCOMPLETE = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


async def finish_run(result: RunResult, output: Path | None, received: int | None) -> int:
    """Print the summary, write the record (even a partial one), pick the exit code.

    The summary comes first so that a run whose record cannot be written (a full disk) still
    shows what it measured; the failed write then exits 1 whatever the run's outcome."""
    from rackscope.runner.results.io import write_run

    print(format_summary(result), flush=True)
    if output is not None:
        try:
            path = await asyncio.to_thread(write_run, result, output)
        except ResultError as exc:
            print(f"rackscope run: error: the run ended but its record was not written: {exc}", file=sys.stderr)
            return EXIT_INCOMPLETE
        print(f"record written to {path}", file=sys.stderr)
    if received is not None:
        return EXIT_SIGINT if received == signal.SIGINT else EXIT_SIGTERM
    return 0 if result.complete else EXIT_INCOMPLETE


def check_output(path: Path) -> None:
    """Fail before the run, not after it, when the record could not be written."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name such as {path / 'run.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output: cannot create {path.parent}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output: {path.parent} is not writable")


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1e3:,.1f}"


def format_summary(result: RunResult) -> str:
    """A short human summary of a run for the terminal."""
    s = result.summary
    cfg = result.config
    lines = [
        f"run {result.run_id}: {cfg['engine']} {cfg['model']} {cfg['scenario']}"
        + ("" if s["complete"] else f"  INCOMPLETE ({s['stop_reason']})"),
        f"  duration         {s['duration_s']:.2f} s",
        f"  requests         {s['requests_completed']:,} completed, {s['requests_failed']:,} failed"
        + (f" {s['requests_failed_by_error']}" if s["requests_failed"] else "")
        + (f", {s['requests_cancelled']:,} stopped" if s["requests_cancelled"] else ""),
        f"  output tokens/s  {s['output_tokens_per_s']:,.1f}"
        + (f"  ({s['output_tokens_per_s_per_gpu']:,.1f} per GPU)" if s["output_tokens_per_s_per_gpu"] else ""),
    ]
    if s["energy_j"] is not None:
        lines.append(
            f"  energy           {s['energy_j']:,.0f} J, {s['average_power_w']:,.0f} W, "
            f"{s['output_tokens_per_j']:.3f} tokens/J"
        )
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        d = s[key]
        lines.append(f"  {name:<5} ms p50/p90/p99  {_ms(d['p50'])} / {_ms(d['p90'])} / {_ms(d['p99'])}")
    if "validity" in s:
        lines.append(
            f"  {s['validity']} (p99 TTFT <= {s['ttft_limit_s'] * 1e3:g} ms, "
            f"p99 TPOT <= {s['tpot_limit_s'] * 1e3:g} ms); goodput {s['goodput_requests_per_s']:.2f} req/s"
            + (f"; {'; '.join(s['validity_reasons'])}" if s["validity_reasons"] else "")
        )
    if result.sweep and result.point_summaries:
        lines += _sweep_lines(result)
    lines += server_lines(result.server)
    return "\n".join(lines)


def server_lines(section: Any) -> list[str]:
    """The server's own view of the run (its metrics page), when the run read it."""
    from rackscope.runner.server_view import describe

    described = describe(section)
    return [f"  {'server view' if i == 0 else '':<16} {line}" for i, line in enumerate(described)]


_CHOSEN_BY = {
    "meets_limits": "the highest output tokens/s that meets the limits",
    "no_point_meets_limits": "no point meets the limits: the highest output tokens/s",
    "no_limits": "no limits set: the highest output tokens/s",
}


def _point_name(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, int | float) else f"{k} {v}" for k, v in point.items()) or "-"


def _sweep_lines(result: RunResult) -> list[str]:
    """One row per sweep point, and which point the headline figures above are."""
    s = result.summary
    chosen = s.get("sweep") or {}
    meets = {True: "yes", False: "no"}
    header = (f"  {'point':<18} {'tokens/s':>10} {'tokens/J':>9} {'TTFT p50':>9} {'p99':>9} "
              f"{'TPOT p50':>9} {'p99':>8}  meets limits")
    lines = [
        f"  the figures above are point {_point_name(chosen.get('point') or {})}"
        f" ({_CHOSEN_BY.get(str(chosen.get('chosen_by')), '?')}); every point (ms):",
        header,
    ]
    for phase, p in zip(result.phases, result.point_summaries, strict=True):
        tpj = p["output_tokens_per_j"]
        lines.append(
            f"  {_point_name(phase.point or {}):<18} {p['output_tokens_per_s']:>10,.1f} "
            f"{'-' if tpj is None else format(tpj, '.3f'):>9} {_ms(p['ttft_s']['p50']):>9} "
            f"{_ms(p['ttft_s']['p99']):>9} {_ms(p['tpot_s']['p50']):>9} {_ms(p['tpot_s']['p99']):>8}  "
            f"{meets.get(p['valid'], '-') if 'valid' in p else '- (no limits)'}"
            + ("" if p["complete"] else "  INCOMPLETE")
        )
    return lines
