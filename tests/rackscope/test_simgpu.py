"""The simulated GPU model: power follows load, energy is its exact integral, faults bite."""

import math
import statistics

import pytest

from rackscope.clock import VirtualClock
from rackscope.simgpu import (
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_SW_POWER_CAP,
    PROFILES,
    make_node_gpus,
    node_variation,
    profile,
)


def test_profiles_carry_the_published_figures() -> None:
    assert PROFILES["gb300"].llama2_70b_tokens_per_s == pytest.approx(15_290.9, abs=0.1)
    assert PROFILES["h100"].llama2_70b_tokens_per_s == pytest.approx(3_065.6, abs=0.1)
    assert PROFILES["gb300"].power_limit_w == 1400
    assert PROFILES["b200"].hbm_bytes == 180 * 2**30
    with pytest.raises(ValueError, match="unknown GPU model 'a100'"):
        profile("a100")


def test_power_moves_between_idle_and_limit_with_load() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("h100", 1, clock)
    assert gpu.power_w() == pytest.approx(70.0)
    gpu.set_load(1.0)
    assert 0.9 * 700 < gpu.power_w() <= 700
    gpu.set_load(0.5)
    assert 70 < gpu.power_w() < 0.9 * 700


def test_energy_is_the_exact_integral_of_piecewise_power() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("gb300", 1, clock)
    expected = 0.0
    for load, seconds in [(0.0, 3.0), (1.0, 10.0), (0.3, 4.5), (0.0, 1.0)]:
        gpu.set_load(load)
        power = gpu.power_w()
        clock.advance(seconds)
        expected += power * seconds
    gpu.advance()
    assert gpu.energy_j == pytest.approx(expected, rel=1e-12)


def test_power_cap_lowers_power_speed_and_sets_the_throttle_bit() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("gb300", 1, clock)
    gpu.set_load(1.0)
    full_speed = gpu.speed()
    gpu.set_faults(power_cap_w=700.0)
    assert gpu.power_w() == pytest.approx(700.0)
    assert 0.6 * full_speed < gpu.speed() < 0.85 * full_speed
    assert gpu.throttle_reasons() & CLOCK_EVENT_SW_POWER_CAP


def test_thermal_throttle_heats_and_slows() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("h200", 1, clock)
    gpu.set_load(1.0)
    speed = gpu.speed()
    gpu.set_faults(thermal_throttle=True)
    clock.advance(200)
    gpu.advance()
    assert gpu.speed() == pytest.approx(speed * 0.7)
    assert gpu.temperature_c > 90
    assert gpu.throttle_reasons() & CLOCK_EVENT_HW_THERMAL


def test_nvlink_bytes_follow_the_rate_and_degrade() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("b200", 1, clock)
    gpu.set_load(1.0, nvlink_tx_bytes_per_s=100e9, nvlink_rx_bytes_per_s=50e9)
    clock.advance(2)
    gpu.set_faults(nvlink_degraded=True)  # integrates first: 2 s at full bandwidth
    assert gpu.nvlink_tx_bytes == pytest.approx(200e9)
    gpu.set_load(1.0, nvlink_tx_bytes_per_s=900e9)
    clock.advance(1)
    gpu.advance()
    assert gpu.nvlink_tx_bytes == pytest.approx(200e9 + 0.4 * 900e9)
    assert gpu.nvlink_rx_bytes == pytest.approx(150e9)


def test_dropped_gpu_draws_nothing_and_records_xid_79() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("h100", 1, clock)
    gpu.set_faults(dropped=True)
    assert gpu.power_w() == 0.0 and gpu.speed() == 0.0
    assert (gpu.xid_errors, gpu.last_xid) == (1, 79)


def test_memory_tracks_weights_and_kv_cache_and_stays_within_hbm() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("h100", 1, clock)
    base = gpu.memory_used_bytes()
    gpu.weights_bytes = 70 * 10**9
    gpu.set_load(0.5, kv_bytes=5 * 10**9)
    assert gpu.memory_used_bytes() == base + 75 * 10**9
    gpu.set_load(0.5, kv_bytes=10**12)
    assert gpu.memory_used_bytes() == gpu.profile.hbm_bytes


def test_node_variation_is_seeded_and_shaped_like_the_azure_rack() -> None:
    factors = [node_variation("r1", f"n{i:02d}") for i in range(1, 19)]
    assert factors == [node_variation("r1", f"n{i:02d}") for i in range(1, 19)]
    assert statistics.mean(factors) == pytest.approx(1.0, abs=0.015)
    spread = (max(factors) - min(factors)) / statistics.mean(factors)
    assert 0.02 < spread < 0.12
    assert node_variation("r1", "n01", seed=1) != node_variation("r1", "n01", seed=0)


def test_temperature_relaxes_with_the_time_constant() -> None:
    clock = VirtualClock()
    (gpu,) = make_node_gpus("h100", 1, clock)
    start = gpu.temperature_c
    gpu.set_load(1.0)
    target = 30.0 + gpu.power_w() * 0.035
    clock.advance(20.0)
    gpu.advance()
    assert gpu.temperature_c == pytest.approx(target + (start - target) * math.exp(-1.0))
