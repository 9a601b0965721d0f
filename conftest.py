"""What every test shares: the `slow` marker's meaning and a working directory of its own.

Each test runs in its own temporary directory, so a command that writes where it stands (the
default `results/` folder of `rackscope run`, the agent and `rack run`) never writes into the
repository. Shared helpers (waiting on conditions, free ports, processes under a memory limit)
live in `tests/helpers`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
