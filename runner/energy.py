"""Energy meters: cumulative joules per GPU, read at a window's edges and about once a second."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rackscope.simgpu import SimGpu


@runtime_checkable
class EnergyMeter(Protocol):
    """Cumulative energy per GPU. ``read`` returns joules keyed ``"<node>/<gpu index>"``; it is
    called at a window's start and end and about once a second in between."""

    def read(self) -> dict[str, float]: ...


class SimEnergyMeter:
    """An ``EnergyMeter`` over simulated GPUs (integrated exactly up to the clock's now)."""

    def __init__(self, gpus: list[SimGpu], node: str) -> None:
        self.gpus = gpus
        self.node = node

    def read(self) -> dict[str, float]:
        out = {}
        for gpu in self.gpus:
            gpu.advance()
            out[f"{self.node}/{gpu.index}"] = gpu.energy_j
        return out
