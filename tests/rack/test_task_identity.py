"""A rack task's identity: flags over RACKSCOPE_* variables over the scheduler's, and a clear
error naming what to set when nothing gives a value; and the `rack task` command's flags."""

from __future__ import annotations

import argparse

import pytest

from rackscope.cli import build_parser, main
from rackscope.errors import ConfigError
from rackscope.rack.identity import resolve_identity

SLURM = {"SLURM_PROCID": "2", "SLURM_NTASKS": "18", "SLURMD_NODENAME": "gpu07", "SLURM_JOB_ID": "4242",
         "SLURM_STEP_ID": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NAME": "rack.sbatch"}


def test_srun_variables_give_the_whole_identity_but_the_rack() -> None:
    me = resolve_identity(SLURM, rack="r1")
    assert (me.rank, me.tasks, me.node, me.rack, me.run_id) == (2, 18, "gpu07", "r1", "slurm-4242-1")
    assert me.scheduler == "slurm"
    assert me.sources == {"rank": "SLURM_PROCID", "tasks": "SLURM_NTASKS", "node": "SLURMD_NODENAME",
                          "rack": "--rack", "run_id": "SLURM_JOB_ID, SLURM_STEP_ID"}
    assert me.scheduler_env["SLURM_JOB_ID"] == "4242"
    assert me.describe() == "rank 2 of 18 (gpu07)"


def test_the_rack_is_never_taken_from_the_job_name() -> None:
    with pytest.raises(ConfigError, match=r"which rack is this: give --rack NAME \(or RACKSCOPE_RACK\)"):
        resolve_identity(SLURM)


def test_flags_win_over_variables_and_variables_over_the_scheduler() -> None:
    env = {**SLURM, "RACKSCOPE_RANK": "3", "RACKSCOPE_TASKS": "4", "RACKSCOPE_NODE": "envnode",
           "RACKSCOPE_RACK": "envrack", "RACKSCOPE_RUN_ID": "envrun"}
    me = resolve_identity(env)
    assert (me.rank, me.tasks, me.node, me.rack, me.run_id) == (3, 4, "envnode", "envrack", "envrun")
    assert set(me.sources.values()) == {"RACKSCOPE_RANK", "RACKSCOPE_TASKS", "RACKSCOPE_NODE", "RACKSCOPE_RACK",
                                        "RACKSCOPE_RUN_ID"}
    me = resolve_identity(env, rank=0, tasks=2, node="flagnode", rack="flagrack", run_id="flagrun")
    assert (me.rank, me.tasks, me.node, me.rack, me.run_id) == (0, 2, "flagnode", "flagrack", "flagrun")
    assert me.sources == {"rank": "--rank", "tasks": "--tasks", "node": "--node", "rack": "--rack",
                          "run_id": "--run-id"}


def test_an_empty_variable_counts_as_unset() -> None:
    me = resolve_identity({**SLURM, "RACKSCOPE_NODE": "", "RACKSCOPE_RUN_ID": ""}, rack="r1")
    assert (me.node, me.run_id) == ("gpu07", "slurm-4242-1")


def test_kubernetes_indexed_job() -> None:
    env = {"JOB_COMPLETION_INDEX": "5", "RACKSCOPE_NODE": "gb300-node-5", "RACKSCOPE_RACK": "r1",
           "RACKSCOPE_RUN_ID": "rackscope-rack-r1", "HOSTNAME": "rackscope-rack-r1-5-abcde"}
    me = resolve_identity(env, tasks=18)
    assert (me.rank, me.tasks, me.node, me.run_id, me.scheduler) == (5, 18, "gb300-node-5", "rackscope-rack-r1",
                                                                      "kubernetes")
    assert me.sources["rank"] == "JOB_COMPLETION_INDEX"
    assert me.scheduler_env == {"JOB_COMPLETION_INDEX": "5", "HOSTNAME": "rackscope-rack-r1-5-abcde"}


def test_several_tasks_per_node_take_the_rank_as_a_suffix() -> None:
    names = [resolve_identity({**SLURM, "SLURM_PROCID": str(r)}, rack="r1", node_from="name-rank").node
             for r in range(3)]
    assert names == ["gpu07-0", "gpu07-1", "gpu07-2"]
    assert resolve_identity(SLURM, rack="r1", node="n01", node_from="name-rank").node == "n01-2"


@pytest.mark.parametrize(("env", "flags", "message"), [
    ({}, {}, r"no task rank: run under srun \(SLURM_PROCID\) or in a Kubernetes Indexed Job "
             r"\(JOB_COMPLETION_INDEX\), or give --rank N"),
    ({"JOB_COMPLETION_INDEX": "0"}, {}, r"how many tasks take part is not known: .*give --tasks N"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, {"rack": "r1"}, r"no node name: give --node NAME"),
    ({"JOB_COMPLETION_INDEX": "0"}, {"tasks": 2, "node": "n1", "rack": "r1"},
     r"no run id: give --run-id ID \(or RACKSCOPE_RUN_ID\), the same on every task"),
    ({"SLURM_PROCID": "x1", "SLURM_NTASKS": "2"}, {}, r"SLURM_PROCID must be a whole number .*'x1'"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, {}, r"rank 2 \(SLURM_PROCID\) is not below the 2 tasks"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, {}, r"SLURM_NTASKS must be between 1 and 4096, not 0"),
    ({**SLURM, "SLURMD_NODENAME": "gpu 07"}, {"rack": "r1"},
     r"SLURMD_NODENAME 'gpu 07' is not a valid node name: 1-128 letters"),
    (SLURM, {"rack": "r/1"}, r"--rack 'r/1' is not a valid rack name"),
    (SLURM, {"rack": "r1", "node_from": "host"}, r"--node-from must be one of name, name-rank"),
])
def test_missing_or_bad_identity_is_a_clear_error(env: dict[str, str], flags: dict[str, object], message: str
                                                  ) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_identity(env, **flags)  # type: ignore[arg-type]


# --- the command ------------------------------------------------------------------------------------
def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def test_a_task_takes_every_flag_of_rackscope_run() -> None:
    run, task = _options(_subparser("run")), _options(_subparser("rack", "task"))
    assert run <= task
    assert task - run == {"--results", "--rank", "--tasks", "--node-from", "--barrier-timeout", "--start-lead"}
    args = build_parser().parse_args(["rack", "task", "--results", "r", "--engine", "sim", "--duration", "5m",
                                      "--barrier-timeout", "2m"])
    assert (args.duration_s, args.barrier_timeout_s, args.rack, args.node, args.run_id) == (300.0, 120.0, None, None,
                                                                                           None)


def test_task_without_identity_exits_2_naming_what_to_set(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("SLURM_PROCID", "JOB_COMPLETION_INDEX", "RACKSCOPE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["rack", "task", "--results", "res", "--duration", "1"]) == 2
    assert "no task rank" in capsys.readouterr().err


def test_task_refuses_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rack", "task", "--results", "res", "--output", "x.json", "--duration", "1"]) == 2
    assert "--output does not apply" in capsys.readouterr().err
