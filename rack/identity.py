"""Who a rack task is: its rank among the tasks, their number, its node, rack and run id.

Each value comes from the first of these that has it: the flag, then the ``RACKSCOPE_*``
variable, then the scheduler that started the task. Nothing is guessed: a value none of them
gives is an error that says which flag or variable would give it.

| value | flag | variable | Slurm (``srun``) | Kubernetes (Indexed Job) |
|---|---|---|---|---|
| rank | ``--rank`` | ``RACKSCOPE_RANK`` | ``SLURM_PROCID`` | ``JOB_COMPLETION_INDEX`` |
| tasks | ``--tasks`` | ``RACKSCOPE_TASKS`` | ``SLURM_NTASKS`` | (none: the Job's ``completions``, as ``--tasks``) |
| node | ``--node`` | ``RACKSCOPE_NODE`` | ``SLURMD_NODENAME`` | (``RACKSCOPE_NODE`` from ``spec.nodeName``) |
| rack | ``--rack`` | ``RACKSCOPE_RACK`` | (none) | (none) |
| run id | ``--run-id`` | ``RACKSCOPE_RUN_ID`` | ``slurm-JOBID-STEPID`` | (``RACKSCOPE_RUN_ID`` from the Job's name) |

The rack is never taken from the scheduler: Slurm's job name defaults to the script's or the
command's name, which would label a rack ``rackscope`` without anyone noticing.

With ``--node-from name-rank`` the node name gets the rank as a suffix (``n01-0``, ``n01-1``):
for several tasks on one node (one per GPU group, or a test on one machine), whose node names
would otherwise collide.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError
from rackscope.runner.config import IDENTIFIER_RULE

# A rack of GB300 NVL72 is 18 nodes; a few thousand tasks is far beyond any one rack run, and
# bounds what the barrier and collect read.
MAX_TASKS = 4096
NODE_FROM = ("name", "name-rank")
# Scheduler variables kept in node.json, so a node's files say where they came from.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                   "SLURMD_NODENAME", "SLURM_JOB_NAME")
KUBERNETES_VARIABLES = ("JOB_COMPLETION_INDEX", "HOSTNAME")
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_COUNT = re.compile(r"^[0-9]{1,9}$")
_SHOWN_CHARS = 40
Scheduler = Literal["slurm", "kubernetes", "none"]


@dataclass(frozen=True)
class TaskIdentity:
    """One task of a rack run. ``sources`` says where each value came from (a flag or a
    variable), for messages and for the node's files."""

    rank: int
    tasks: int
    node: str
    rack: str
    run_id: str
    scheduler: Scheduler
    host: str
    sources: dict[str, str] = field(default_factory=dict)
    scheduler_env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.tasks} ({self.node})"


def scheduler_of(env: Mapping[str, str]) -> Scheduler:
    """Which scheduler started this process, by the variables it sets in every task."""
    if "SLURM_PROCID" in env:
        return "slurm"
    if "JOB_COMPLETION_INDEX" in env:
        return "kubernetes"
    return "none"


def _first(flag: tuple[str, str | int | None], env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """(value, where it came from) from the flag, else the first variable set (and not empty)."""
    flag_name, value = flag
    if value is not None:
        return str(value), flag_name
    for name in names:
        if env.get(name):
            return env[name], name
    return None


def _count(text: str, where: str, what: str) -> int:
    if not _COUNT.match(text):
        raise ConfigError(f"{where} must be a whole number ({what}), not {text[:_SHOWN_CHARS]!r}")
    return int(text)


def _identifier(text: str, where: str, what: str) -> str:
    if not _IDENTIFIER.match(text):
        raise ConfigError(f"{where} {text[:_SHOWN_CHARS]!r} is not a valid {what}: {IDENTIFIER_RULE}")
    return text


def resolve_identity(
    env: Mapping[str, str],
    *,
    rank: int | None = None,
    tasks: int | None = None,
    node: str | None = None,
    rack: str | None = None,
    run_id: str | None = None,
    node_from: str = "name",
) -> TaskIdentity:
    """The task's identity from its flags (None: not given) and environment ``env``;
    ``ConfigError`` naming the missing or bad value otherwise."""
    scheduler = scheduler_of(env)
    sources: dict[str, str] = {}

    got = _first(("--rank", rank), env, "RACKSCOPE_RANK", "SLURM_PROCID", "JOB_COMPLETION_INDEX")
    if got is None:
        raise ConfigError(
            "no task rank: run under srun (SLURM_PROCID) or in a Kubernetes Indexed Job (JOB_COMPLETION_INDEX), "
            "or give --rank N (or RACKSCOPE_RANK)"
        )
    rank_value = _count(got[0], got[1], "the task's rank, from 0")
    sources["rank"] = got[1]

    got = _first(("--tasks", tasks), env, "RACKSCOPE_TASKS", "SLURM_NTASKS")
    if got is None:
        raise ConfigError(
            "how many tasks take part is not known: run under srun (SLURM_NTASKS) or give --tasks N "
            "(or RACKSCOPE_TASKS; in an Indexed Job, its completions)"
        )
    tasks_value = _count(got[0], got[1], "how many tasks take part")
    sources["tasks"] = got[1]
    if not 1 <= tasks_value <= MAX_TASKS:
        raise ConfigError(f"{got[1]} must be between 1 and {MAX_TASKS}, not {tasks_value}")
    if rank_value >= tasks_value:
        raise ConfigError(f"rank {rank_value} ({sources['rank']}) is not below the {tasks_value} tasks "
                          f"({sources['tasks']}): ranks run from 0 to {tasks_value - 1}")

    got = _first(("--node", node), env, "RACKSCOPE_NODE", "SLURMD_NODENAME")
    if got is None:
        raise ConfigError(
            "no node name: give --node NAME (or RACKSCOPE_NODE; under srun, SLURMD_NODENAME gives it)"
        )
    base = _identifier(got[0], got[1], "node name")
    sources["node"] = got[1]
    if node_from not in NODE_FROM:
        raise ConfigError(f"--node-from must be one of {', '.join(NODE_FROM)}, not {node_from[:_SHOWN_CHARS]!r}")
    node_value = base if node_from == "name" else _identifier(f"{base}-{rank_value}", got[1], "node name with rank")

    got = _first(("--rack", rack), env, "RACKSCOPE_RACK")
    if got is None:
        raise ConfigError("which rack is this: give --rack NAME (or RACKSCOPE_RACK), the same on every task")
    rack_value = _identifier(got[0], got[1], "rack name")
    sources["rack"] = got[1]

    got = _first(("--run-id", run_id), env, "RACKSCOPE_RUN_ID")
    if got is None and scheduler == "slurm" and env.get("SLURM_JOB_ID"):
        # One rack run per job step: a second srun in the same job is another run.
        got = (f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID') or '0'}", "SLURM_JOB_ID, SLURM_STEP_ID")
    if got is None:
        raise ConfigError(
            "no run id: give --run-id ID (or RACKSCOPE_RUN_ID), the same on every task of the run "
            "(under srun it is slurm-JOBID-STEPID)"
        )
    run_id_value = _identifier(got[0], got[1], "run id")
    sources["run_id"] = got[1]

    names = SLURM_VARIABLES if scheduler == "slurm" else KUBERNETES_VARIABLES if scheduler == "kubernetes" else ()
    return TaskIdentity(
        rank=rank_value,
        tasks=tasks_value,
        node=node_value,
        rack=rack_value,
        run_id=run_id_value,
        scheduler=scheduler,
        host=socket.gethostname(),
        sources=sources,
        scheduler_env={name: env[name][:256] for name in names if name in env},
    )


__all__ = ["MAX_TASKS", "NODE_FROM", "Scheduler", "TaskIdentity", "resolve_identity", "scheduler_of"]
