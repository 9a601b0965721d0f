"""The simulated GPU source reads the shared model: load in, samples out."""

import re

import pytest

from rackscope.agent.sources.base import NVLINK_ERROR_TYPES, GpuSource, throttle_names
from rackscope.agent.sources.sim import SimSource
from rackscope.agent.telemetry.series import ERROR_SERIES
from rackscope.clock import VirtualClock
from rackscope.dashboards import names
from rackscope.simgpu import make_node_gpus


def test_samples_follow_the_load_the_engine_sets() -> None:
    clock = VirtualClock()
    gpus = make_node_gpus("gb300", 4, clock, rack="r1", node="n05")
    source = SimSource(gpus)
    assert isinstance(source, GpuSource)
    infos = source.open()
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert {i.model for i in infos} == {"NVIDIA GB300"}
    assert all(i.simulated and i.power_limit_w == 1400 and i.memory_total_bytes == 288 * 2**30 for i in infos)
    assert len({i.uuid for i in infos}) == 4

    idle = source.sample()
    assert all(s.ok and s.power_w == pytest.approx(180.0) for s in idle)
    assert throttle_names(idle[0].throttle_reasons or 0) == ["gpu_idle"]

    gpus[1].weights_bytes = 35 * 10**9
    gpus[1].set_load(1.0, kv_bytes=100 * 10**9, nvlink_tx_bytes_per_s=10e9, nvlink_rx_bytes_per_s=10e9)
    clock.advance(10.0)
    busy = source.sample()
    assert busy[1].power_w == pytest.approx(1400 * 0.96)
    assert busy[1].energy_j == pytest.approx(1400 * 0.96 * 10.0)
    assert busy[0].energy_j == pytest.approx(180.0 * 10.0)
    assert busy[1].memory_used_bytes == 600 * 2**20 + 135 * 10**9
    assert busy[1].nvlink_tx_bytes == 100 * 10**9
    assert busy[1].utilization == 1.0 and busy[0].utilization == 0.0
    assert busy[1].temperature_c is not None and busy[1].temperature_c > busy[0].temperature_c


def test_a_dropped_gpu_reports_not_ok_and_the_rest_carry_on() -> None:
    clock = VirtualClock()
    gpus = make_node_gpus("h100", 2, clock)
    source = SimSource(gpus)
    source.open()
    gpus[0].set_faults(dropped=True)
    first, second = source.sample()
    assert not first.ok and first.power_w is None and "fallen off the bus" in (first.error or "")
    assert second.ok and second.power_w == pytest.approx(70.0)


def test_a_node_needs_gpus() -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        SimSource([])


def test_a_degraded_nvlink_counts_link_errors_and_a_healthy_one_none() -> None:
    clock = VirtualClock()
    gpus = make_node_gpus("h100", 2, clock)
    source = SimSource(gpus)
    source.open()
    gpus[0].set_faults(nvlink_degraded=True)
    clock.advance(10.0)
    degraded, healthy = source.sample()
    assert (degraded.nvlink_crc_errors, degraded.nvlink_replay_errors, degraded.nvlink_recovery_errors) == (400, 80, 5)
    assert (healthy.nvlink_crc_errors, healthy.nvlink_replay_errors, healthy.nvlink_recovery_errors) == (0, 0, 0)
    gpus[0].set_faults(nvlink_degraded=False)  # repaired: the counters stay where they were
    clock.advance(10.0)
    assert source.sample()[0].nvlink_crc_errors == 400


def test_the_nvlink_alert_selects_exactly_the_nvlink_error_series_the_agent_exports() -> None:
    pattern = re.fullmatch(r'(\w+)="(.*)"', names.NVLINK_ERRORS)
    assert pattern is not None
    label, value = pattern.groups()
    selected = {dict(extra)["error.type"] for extra, _ in ERROR_SERIES if dict(extra).get(label) == value}
    assert selected == {t for t, _ in NVLINK_ERROR_TYPES} == {"crc", "replay", "recovery"}


def test_error_types_follow_the_hardware_conventions() -> None:
    # ECC errors are "corrected" / "uncorrected", a link's errors are named for the error (the
    # link attribute says which link), and XID events are "xid".
    by_type = {dict(extra)["error.type"]: dict(extra).get("link") for extra, _ in ERROR_SERIES}
    assert by_type == {
        "xid": None, "corrected": None, "uncorrected": None,
        "crc": "nvlink", "replay": "nvlink", "recovery": "nvlink",
    }
