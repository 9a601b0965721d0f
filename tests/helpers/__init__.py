"""What many tests share: waiting on a condition, free ports, processes under a memory limit."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# What a rackscope process started by a hostile test may map: a regression that buffers a peer's
# endless bytes dies of MemoryError instead of taking the machine down. Python plus the agent's
# imports (uvicorn, FastAPI, OpenTelemetry, grpc) map about 1 GiB of address space, most of it untouched.
DEFAULT_MEMORY_LIMIT_MIB = 2048


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 10.0, interval_s: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what``.

    A check that raises counts as not yet (a port that does not answer, a file half written)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = check()
        except Exception as exc:  # not ready yet; reported if the wait runs out
            last = exc
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" (last: {last!r})" if last else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _limit_memory(limit_mib: int) -> Callable[[], None]:
    def apply() -> None:
        limit = limit_mib * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def rackscope_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("rackscope")), *args]


def start_limited(
    argv: Sequence[str],
    memory_mib: int = DEFAULT_MEMORY_LIMIT_MIB,
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """Start ``argv`` with its address space capped at ``memory_mib`` (RLIMIT_AS, as ``ulimit -v``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(  # noqa: S603 - argv is the test's own
        list(argv), text=True, env=full_env, preexec_fn=_limit_memory(memory_mib), **popen
    )


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 5.0) -> None:
    """Terminate, then kill, and reap: never leave a process behind a failed test."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def run_limited(argv: Sequence[str], cwd: Path, log_path: Path, timeout_s: float = 120.0) -> tuple[int, float, int]:
    """Run ``argv`` to its end under ``start_limited``, its output into ``log_path``; returns
    its exit status, the seconds it took and its own peak RSS in bytes (``wait4`` reports the
    child's, which ``Popen.wait`` does not)."""
    with log_path.open("w") as log:
        t0 = time.monotonic()
        proc = start_limited(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            def ended() -> tuple[int, int, resource.struct_rusage] | None:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                return (pid, status, usage) if pid else None

            _, status, usage = wait_for(f"{Path(argv[0]).name} to end", ended, timeout_s=timeout_s)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            stop_process(proc)
        return proc.returncode, time.monotonic() - t0, usage.ru_maxrss * 1024
