"""The Run comparison dashboard: one run's throughput and tokens per joule against a baseline
run, each picked by run_id and joined to the node series through rackscope_run_info."""

from __future__ import annotations

from typing import Any

from rackscope.dashboards import names as n
from rackscope.dashboards import panels as p
from rackscope.dashboards.panels import Query as Q

UID = "rackscope-run-comparison"

RACK = 'rack=~"$rack"'


def _in_run(series: str, var: str) -> str:
    """Node series restricted to the nodes of run ``$var`` while it was active."""
    return f'{series}{{{RACK}}} and on (rack, node) ({n.RUN_INFO}{{{RACK}, run_id="${var}"}} == 1)'


def tokens_per_s(var: str) -> str:
    return f"sum({_in_run(n.NODE_TPS, var)})"


def tokens_per_j(var: str) -> str:
    return f"{tokens_per_s(var)} / sum({_in_run(n.NODE_POWER_W, var)})"


def mean(expr: str) -> str:
    """Mean over the dashboard range of the times the run was active (subquery)."""
    return f"avg_over_time(({expr})[$__range:])"


def build() -> dict[str, Any]:
    b = (
        p.Board(UID, "rackscope / Run comparison",
                "A run's output tokens/s and tokens per joule against a baseline run. Set the time range to "
                "cover both runs; means are taken over the time each run was active.")
        .variable("rack", "Rack", p.label_values(n.NODE_INFO, "rack"))
        .variable("run", "Run", p.label_values(f"{n.RUN_INFO}{{{RACK}}}", "run_id"), multi=False, include_all=False)
        .variable("baseline_run", "Baseline run", p.label_values(f"{n.RUN_INFO}{{{RACK}}}", "run_id"),
                  multi=False, include_all=False)
    )
    ratio = p.thresholds((None, "red"), (0.9, "orange"), (0.97, "green"))

    b.row("Runs")
    b.add(p.table_panel(), "Runs compared", p.NONE,
          "Identity of both runs (scenario, model, engine) and the nodes that ran them within the time range.",
          [Q(f'max_over_time({n.RUN_INFO}{{{RACK}, run_id=~"$run|$baseline_run"}}[$__range])',
             instant=True, table_format=True)], w=24, h=6)
    b.add(p.stat_panel(graph=False), "Run: mean output tokens/s", p.TOKENS_PER_S,
          "Mean output tokens/s of the run's nodes while it was active.",
          [Q(mean(tokens_per_s("run")), instant=True)], w=4, h=5)
    b.add(p.stat_panel(graph=False), "Baseline: mean output tokens/s", p.TOKENS_PER_S,
          "Mean output tokens/s of the baseline run's nodes while it was active.",
          [Q(mean(tokens_per_s("baseline_run")), instant=True)], w=4, h=5)
    b.add(p.stat_panel(graph=False).thresholds(ratio), "Throughput vs baseline", p.PERCENT_UNIT,
          "Run mean output tokens/s as a share of the baseline run's.",
          [Q(f"{mean(tokens_per_s('run'))} / {mean(tokens_per_s('baseline_run'))}", instant=True)], w=4, h=5)
    b.add(p.stat_panel(graph=False), "Run: tokens per joule", p.TOKENS_PER_J,
          "Mean output tokens per joule of the run's nodes while it was active.",
          [Q(mean(tokens_per_j("run")), instant=True)], w=4, h=5)
    b.add(p.stat_panel(graph=False), "Baseline: tokens per joule", p.TOKENS_PER_J,
          "Mean output tokens per joule of the baseline run's nodes while it was active.",
          [Q(mean(tokens_per_j("baseline_run")), instant=True)], w=4, h=5)
    b.add(p.stat_panel(graph=False).thresholds(ratio), "Tokens per joule vs baseline", p.PERCENT_UNIT,
          "Run mean tokens per joule as a share of the baseline run's.",
          [Q(f"{mean(tokens_per_j('run'))} / {mean(tokens_per_j('baseline_run'))}", instant=True)], w=4, h=5)

    b.row("Over time")
    b.add(p.graph_panel().override_by_regexp(*p.dashed("baseline.*")), "Output tokens/s", p.TOKENS_PER_S,
          "Output tokens/s of the run's nodes (solid) and the baseline run's (dashed) while each was active.",
          [Q(tokens_per_s("run"), "run $run"), Q(tokens_per_s("baseline_run"), "baseline $baseline_run")],
          w=12, h=8)
    b.add(p.graph_panel().override_by_regexp(*p.dashed("baseline.*")), "Tokens per joule", p.TOKENS_PER_J,
          "Output tokens per joule of the run (solid) and the baseline run (dashed).",
          [Q(tokens_per_j("run"), "run $run"), Q(tokens_per_j("baseline_run"), "baseline $baseline_run")],
          w=12, h=8)
    b.add(p.bar_gauge_panel(), "Run: mean tokens/s per node", p.TOKENS_PER_S,
          "Each node's mean output tokens/s while the run was active on it.",
          [Q(mean(_in_run(n.NODE_TPS, "run")), "{{node}}", instant=True)], w=12, h=8)
    b.add(p.bar_gauge_panel(), "Baseline: mean tokens/s per node", p.TOKENS_PER_S,
          "Each node's mean output tokens/s while the baseline run was active on it.",
          [Q(mean(_in_run(n.NODE_TPS, "baseline_run")), "{{node}}", instant=True)], w=12, h=8)
    return b.to_dict()
