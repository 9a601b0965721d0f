"""Fault specs parse strictly and act on the simulated GPUs."""

import pytest

from rackscope.agent.faults import Fault, apply_fault, clear_all, parse_fault
from rackscope.clock import VirtualClock
from rackscope.errors import ConfigError
from rackscope.simgpu import make_node_gpus


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("power-cap=700@0", Fault("power-cap", 0, 700.0)),
        ("power-cap", Fault("power-cap", None, None)),
        ("thermal-throttle@3", Fault("thermal-throttle", 3, None)),
        ("engine-slow=1.5", Fault("engine-slow", None, 1.5)),
        ("gpu-drop@1", Fault("gpu-drop", 1, None)),
    ],
)
def test_parse(spec: str, fault: Fault) -> None:
    assert parse_fault(spec) == fault


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("meltdown", "unknown fault 'meltdown'"),
        ("power-cap=lots", "bad value"),
        ("power-cap@x", "bad GPU index"),
        ("power-cap=-5", "must be positive"),
        ("engine-slow@1", "whole node"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_fault(spec)


def test_apply_and_clear() -> None:
    gpus = make_node_gpus("gb300", 4, VirtualClock())
    assert apply_fault(gpus, parse_fault("power-cap")) == [0, 1, 2, 3]
    assert all(g.faults.power_cap_w == pytest.approx(840.0) for g in gpus)
    assert apply_fault(gpus, parse_fault("gpu-drop@2")) == [2]
    assert gpus[2].faults.dropped and not gpus[1].faults.dropped
    with pytest.raises(ConfigError, match="GPU 9 does not exist"):
        apply_fault(gpus, parse_fault("thermal-throttle@9"))
    clear_all(gpus)
    assert all(g.faults.power_cap_w is None and not g.faults.dropped for g in gpus)


def test_fault_names_are_declared_once() -> None:
    from rackscope.agent.api import FaultBody
    from rackscope.agent.faults import FAULTS, FaultName

    names = [f.value for f in FaultName]
    assert list(FAULTS) == names
    assert all(FAULTS[f] == f.help and f.help for f in FaultName)
    # The API publishes and accepts exactly these names; parsing and checks use the same ones.
    assert FaultBody.model_json_schema()["properties"]["fault"]["enum"] == names
    for name in FaultName:
        assert FaultBody(fault=name.value).fault is name
        assert parse_fault(name.value) == Fault(name)
    with pytest.raises(ValueError, match="fault"):
        FaultBody(fault="meltdown")
