"""A real one-machine Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's
packages (`make slurm`), each a child process of the test session, in a folder of its own.

Everything the daemons use is in that folder: the munge key and socket, a generated
slurm.conf (free ports, state and spool folders, pid and log files), so nothing of the
machine's own Slurm or munge set-up is read or changed. Clients and daemons find the conf
through SLURM_CONF. The node is `sn01` (slurmd -N), listed with 8 CPUs whatever the machine
has (SlurmdParameters=config_overrides), so `srun -n 3` fits on a 2-core machine.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import free_port, stop_process

NODE = "sn01"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sinfo")
# The daemons live in sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NODE_CPUS = 8
START_TIMEOUT_S = 30.0


class SlurmCluster:
    """The daemons of one test cluster; ``env`` is what a client (srun, sinfo) needs."""

    def __init__(self, root: Path, tools: dict[str, str]) -> None:
        self.root = root
        self.tools = tools  # program name -> its path
        self.conf = root / "slurm.conf"
        self.socket = root / "run" / "munge.socket"
        self.logs = root / "log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen[str]] = {}

    # --- set-up ---------------------------------------------------------------------------------
    def _write_files(self) -> None:
        # munged refuses a socket whose folders others cannot traverse, and a key others may read.
        self.root.chmod(0o755)
        for name, mode in (("run", 0o755), ("munge", 0o700), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
            (self.root / name).mkdir(mode=mode)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        user = getpass.getuser()
        ctld_port, slurmd_port = free_port(), free_port()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=rackscope-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, argv: list[str]) -> None:
        out = (self.logs / f"{name}.out").open("w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, text=True)
        out.close()

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        """Until ``ready()``; a daemon that exits meanwhile fails the start at once, with the logs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {START_TIMEOUT_S:g} s:\n{self.diagnostics()}")
            time.sleep(0.1)

    def start(self) -> None:
        self._write_files()
        r = self.root
        self._start("munged", [self.tools["munged"], "--foreground", f"--socket={self.socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                               f"--seed-file={r}/munge/munged.seed", f"--log-file={r}/log/munged.log"])
        self._wait("munged's socket", self.socket.exists)
        self._start("slurmctld", [self.tools["slurmctld"], "-D", "-i"])
        self._start("slurmd", [self.tools["slurmd"], "-D", "-N", NODE])
        self._wait(f"node {NODE} idle in sinfo", lambda: self.node_state() == "idle")

    def node_state(self) -> str:
        done = subprocess.run([self.tools["sinfo"], "-h", "-N", "-n", NODE, "-o", "%T"], env=self.env,
                              capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()

    # --- use ------------------------------------------------------------------------------------
    def srun(self, *argv: str, tasks: int, timeout_s: float = 60.0, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
        """``srun -n TASKS ARGV...`` (every task on the one node), its output captured."""
        return subprocess.run([self.tools["srun"], "-n", str(tasks), "--kill-on-bad-exit=0", *argv], env=self.env,
                              cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)

    def diagnostics(self) -> str:
        """The daemons' logs, for a failed test's message."""
        parts = []
        for path in sorted(self.logs.glob("*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        # slurmd first: it ends the job steps it started; then the controller, then munge.
        for name in reversed(DAEMONS):
            if name in self.procs:
                stop_process(self.procs[name], timeout_s=10.0)


@contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running cluster for the ``with`` block, stopped and removed after it."""
    tools = {name: shutil.which(name, path=SEARCH_PATH) for name in (*DAEMONS, *CLIENTS)}
    missing = [name for name, path in tools.items() if path is None]
    assert not missing, f"{', '.join(missing)} not installed: run `make slurm` (Debian: slurmctld slurmd munge)"
    # Not under pytest's own temporary folder: munged wants every folder above its socket
    # searchable by all, and pytest keeps its base folder private.
    root = Path(tempfile.mkdtemp(prefix="rackscope-slurm-"))
    cluster = SlurmCluster(root, {name: str(path) for name, path in tools.items()})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
