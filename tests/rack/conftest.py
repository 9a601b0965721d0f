"""Fixtures of the rack tests: a real Slurm cluster on this machine, shared by the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rack.slurm_cluster import SlurmCluster, slurm_cluster


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    with slurm_cluster() as cluster:
        yield cluster
