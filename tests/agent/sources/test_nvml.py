"""NvmlSource through the real pynvml bindings against a stand-in libnvidia-ml.so.1.

The stand-in (nvml_standin/standin_nvml.c) is compiled once per session. Each case runs
nvml_standin/run_source.py in a subprocess with LD_LIBRARY_PATH pointing at the stand-in,
because the loader reads that variable only at process start, and asserts on its JSON.
"""

from __future__ import annotations

import ctypes.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rackscope.agent.sources.base import GpuSource
from rackscope.agent.sources.nvml import NvmlSource
from rackscope.errors import SourceError

HERE = Path(__file__).parent / "nvml_standin"
REPO = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024


@dataclass(frozen=True)
class StandIns:
    current: Path  # a recent driver
    old: Path  # a driver without nvmlDeviceGetCurrentClocksEventReasons and GPM


@dataclass
class Run:
    out: dict[str, Any]
    log: str
    calls: dict[str, int]

    def ticks(self, gpu: int) -> list[dict[str, Any]]:
        return [tick[gpu] for tick in self.out["ticks"]]

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.log.splitlines() if text in line]


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> StandIns:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in NVML library")
    root = tmp_path_factory.mktemp("nvml-standin")
    dirs = StandIns(current=root / "current", old=root / "old")
    for directory, flags in ((dirs.current, []), (dirs.old, ["-DSTANDIN_OLD_DRIVER"])):
        directory.mkdir()
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O1", "-Wall", *flags, "-o", str(directory / "libnvidia-ml.so.1"),
             str(HERE / "standin_nvml.c")],
            check=True,
        )  # fmt: skip
    return dirs


def run_source(lib_dir: Path, tmp_path: Path, config: dict[str, object], ticks: int = 3, dt: float = 1.0) -> Run:
    config_file = tmp_path / "nvml.conf"
    config_file.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
    calls_file = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(lib_dir),
        "NVML_STANDIN_CONFIG": str(config_file),
        "NVML_STANDIN_CALLS": str(calls_file),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_source.py"), "--ticks", str(ticks), "--dt", str(dt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    calls: dict[str, int] = {}
    if calls_file.exists():
        for line in calls_file.read_text().splitlines():
            name, count = line.split()
            calls[name] = int(count)
    return Run(out=json.loads(proc.stdout), log=proc.stderr, calls=calls)


GPU0 = {
    "gpu0.name": "NVIDIA H100 80GB HBM3",
    "gpu0.uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
    "gpu0.power_mw": 350_000,
    "gpu0.power_step_mw": 2_500,
    "gpu0.energy_mj": 9_000_000_000,  # since driver load: the source reports since open
    "gpu0.energy_step_mj": 351_000,
    "gpu0.power_limit_mw": 700_000,
    "gpu0.mem_total": 85_899_345_920,
    "gpu0.mem_used": 42_949_672_960,
    "gpu0.util_gpu": 87,
    "gpu0.sm_clock_mhz": 1_980,
    "gpu0.temp_c": 61,
    "gpu0.clock_reasons": 0x44,  # sw power cap + hw thermal
    "gpu0.ecc_corrected": 3,
    "gpu0.ecc_uncorrected": 1,
    "gpu0.nvlink_tx_kib": 1_000_000,
    "gpu0.nvlink_rx_kib": 2_000_000,
    "gpu0.nvlink_step_kib": 4_096,
}
GPU1 = {
    "gpu1.name": "NVIDIA H200",
    "gpu1.uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000001",
    "gpu1.power_mw": 600_000,
    "gpu1.energy_step_mj": 600_000,
    "gpu1.power_limit_mw": 650_000,
    "gpu1.mem_total": 150_323_855_360,
    "gpu1.mem_used": 1_073_741_824,
    "gpu1.util_gpu": 5,
    "gpu1.sm_clock_mhz": 345,
    "gpu1.temp_c": 33,
    "gpu1.clock_reasons": 0x1,
    "gpu1.nvlink_step_kib": 10,
}


def test_nvml_source_satisfies_the_gpu_source_protocol() -> None:
    source = NvmlSource()
    assert isinstance(source, GpuSource)
    assert (source.name, source.simulated) == ("nvml", False)


def test_sample_before_open_raises_and_close_before_open_is_harmless() -> None:
    source = NvmlSource()
    source.close()
    with pytest.raises(SourceError, match="not open"):
        source.sample()


@pytest.mark.slow
def test_two_gpus_give_exact_values_in_our_units(standins: StandIns, tmp_path: Path) -> None:
    started_s = time.time()
    run = run_source(standins.current, tmp_path, {"gpus": 2, **GPU0, **GPU1}, ticks=3)

    assert run.out["probe"] is None
    assert run.out["gpus"] == [
        {
            "index": 0,
            "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
            "model": "NVIDIA H100 80GB HBM3",
            "memory_total_bytes": 85_899_345_920,
            "power_limit_w": 700.0,
            "simulated": False,
        },
        {
            "index": 1,
            "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000001",
            "model": "NVIDIA H200",
            "memory_total_bytes": 150_323_855_360,
            "power_limit_w": 650.0,
            "simulated": False,
        },
    ]
    for t, sample in enumerate(run.ticks(0), start=1):
        assert sample["ok"] is True
        assert sample["error"] is None
        assert started_s <= sample["timestamp_s"] <= time.time()
        assert sample["power_w"] == pytest.approx((350_000 + 2_500 * (t - 1)) / 1000)  # mW -> W
        assert sample["energy_j"] == pytest.approx(351.0 * t)  # mJ since driver load -> J since open
        assert sample["energy_method"] == "counter"
        assert sample["power_limit_w"] == 700.0
        assert sample["memory_used_bytes"] == 42_949_672_960
        assert sample["memory_total_bytes"] == 85_899_345_920
        assert sample["utilization"] == pytest.approx(0.87)
        assert sample["sm_clock_mhz"] == 1980.0
        assert sample["temperature_c"] == 61.0
        assert sample["throttle_reasons"] == 0x44
        assert sample["nvlink_tx_bytes"] == 4_096 * t * 1024  # KiB since open -> bytes
        assert sample["nvlink_rx_bytes"] == 4_096 * t * 1024
        assert (sample["ecc_corrected"], sample["ecc_uncorrected"]) == (3, 1)
        assert (sample["xid_errors"], sample["last_xid"]) == (0, None)
    gpu1 = run.ticks(1)
    assert [s["power_w"] for s in gpu1] == [600.0, 600.0, 600.0]
    assert [s["energy_j"] for s in gpu1] == pytest.approx([600.0, 1200.0, 1800.0])
    assert [s["nvlink_tx_bytes"] for s in gpu1] == [10_240, 20_480, 30_720]
    assert gpu1[0]["utilization"] == pytest.approx(0.05)
    assert gpu1[0]["throttle_reasons"] == 0x1
    # the aggregate all-links scope answers, so one field-values call per tick after open
    assert run.calls["gpu0.field_values"] == 1 + 3
    assert "gpu0.throttle" not in run.calls  # the clocks-event name is used where it exists


def test_energy_counter_increases_tick_after_tick(standins: StandIns, tmp_path: Path) -> None:
    run = run_source(standins.current, tmp_path, {"gpus": 1, "gpu0.energy_step_mj": 1}, ticks=5)
    energies = [s["energy_j"] for s in run.ticks(0)]
    assert energies == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    assert all(b > a for a, b in itertools.pairwise(energies))


def test_unsupported_fields_are_none_logged_once_and_not_asked_again(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 2, **GPU0, **GPU1, "gpu1.unsupported": "temperature,ecc,utilization,clock,clock_events"}
    run = run_source(standins.current, tmp_path, config, ticks=4)

    for sample in run.ticks(1):
        assert sample["ok"] is True
        for name in ("temperature_c", "ecc_corrected", "ecc_uncorrected", "utilization", "sm_clock_mhz"):
            assert sample[name] is None, name
        assert sample["power_w"] == 600.0  # the rest keeps flowing
        assert sample["memory_used_bytes"] == 1_073_741_824
    # the unsupported clocks-event call is not the missing-symbol case: no fallback to the old name
    assert [s["throttle_reasons"] for s in run.ticks(1)] == [None] * 4
    for sample in run.ticks(0):  # the other GPU supports everything
        assert sample["temperature_c"] == 61.0
        assert sample["ecc_corrected"] == 3
    for field in ("temperature", "ecc", "utilization", "sm_clock", "throttle_reasons"):
        assert len(run.log_lines(f"GPU 1: {field} not available")) == 1, run.log
        assert not run.log_lines(f"GPU 0: {field} not available")
    for call in ("temperature", "ecc", "utilization", "clock", "clock_events"):
        assert run.calls[f"gpu1.{call}"] == 1, call  # asked on the first tick only
    assert run.calls["gpu0.temperature"] == 4


def test_missing_energy_counter_integrates_power_and_says_so(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 1, "gpu0.power_mw": 200_000, "gpu0.power_step_mw": 10_000, "gpu0.unsupported": "energy"}
    run = run_source(standins.current, tmp_path, config, ticks=4, dt=0.5)

    samples = run.ticks(0)
    assert [s["energy_method"] for s in samples] == ["integrated"] * 4
    assert [s["power_w"] for s in samples] == [200.0, 210.0, 220.0, 230.0]
    # trapezoids between consecutive power readings, 0.5 s apart; the first reading starts it
    assert [s["energy_j"] for s in samples] == pytest.approx([0.0, 102.5, 210.0, 322.5])
    assert len(run.log_lines("GPU 0: no energy counter")) == 1
    assert run.calls["gpu0.energy"] == 1  # tried at open, never again


def test_an_energy_counter_stepping_back_is_jitter_not_a_reset(standins: StandIns, tmp_path: Path) -> None:
    # The stand-in's counter is unsigned: a step of -500 mJ per read is 0.5 J back each tick.
    config = {"gpus": 2, "gpu0.energy_mj": 9_000_000_000, "gpu0.energy_step_mj": -500, "gpu1.energy_step_mj": 1000}
    run = run_source(standins.current, tmp_path, config, ticks=4)
    assert [s["energy_j"] for s in run.ticks(0)] == [0.0] * 4  # not +9 MJ per tick
    assert [s["energy_method"] for s in run.ticks(0)] == ["counter"] * 4
    assert [s["energy_j"] for s in run.ticks(1)] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert len(run.log_lines("GPU 0 energy counter (mJ) went back")) == 1, run.log


def test_impossible_gpm_rates_are_missing_never_subtracted(standins: StandIns, tmp_path: Path) -> None:
    config: dict[str, object] = {"gpus": 2, "gpu0.unsupported": "field_values", "gpu1.unsupported": "field_values"}
    config |= {"gpu0.gpm": 1, "gpu0.gpm_tx_mibs": -100.0, "gpu0.gpm_rx_mibs": 25.5}
    config |= {"gpu1.gpm": 1, "gpu1.gpm_tx_mibs": 100.0, "gpu1.gpm_rx_mibs": "nan"}
    run = run_source(standins.current, tmp_path, config, ticks=3, dt=0.5)
    assert [s["nvlink_tx_bytes"] for s in run.ticks(0)] == [None] * 3
    assert [s["nvlink_rx_bytes"] for s in run.ticks(0)] == [round(25.5 * MIB * 0.5 * t) for t in (1, 2, 3)]
    assert [s["nvlink_tx_bytes"] for s in run.ticks(1)] == [round(100.0 * MIB * 0.5 * t) for t in (1, 2, 3)]
    assert [s["nvlink_rx_bytes"] for s in run.ticks(1)] == [None] * 3
    assert all(s["ok"] for gpu in (0, 1) for s in run.ticks(gpu))
    assert len(run.log_lines("GPU 0: invalid reading nvlink_tx_rate=-100.0")) == 1, run.log
    assert len(run.log_lines("GPU 1: invalid reading nvlink_rx_rate=nan")) == 1, run.log


def test_a_gpu_that_fails_mid_run_is_marked_while_the_others_carry_on(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 3, **GPU0, **GPU1, "gpu1.lost_from_tick": 3, "gpu1.lost_until_tick": 5}
    run = run_source(standins.current, tmp_path, config, ticks=6)

    lost = run.ticks(1)
    assert [s["ok"] for s in lost] == [True, True, False, False, True, True]
    for sample in lost[2:4]:
        assert "GPU is lost" in sample["error"]
        assert sample["power_w"] is None
        assert sample["energy_j"] is None
        assert sample["memory_used_bytes"] is None
    # it recovers with its energy counted from the same zero (2 energy reads missed)
    assert [s["energy_j"] for s in lost] == pytest.approx([600.0, 1200.0, None, None, 1800.0, 2400.0])
    for gpu in (0, 2):
        assert all(s["ok"] and s["power_w"] is not None for s in run.ticks(gpu))
    assert [s["energy_j"] for s in run.ticks(0)] == pytest.approx([351.0 * t for t in range(1, 7)])
    assert len(run.log_lines("GPU 1 stopped answering NVML")) == 1
    assert len(run.log_lines("GPU 1 answers NVML again")) == 1


def test_a_gpu_lost_for_good_stays_marked(standins: StandIns, tmp_path: Path) -> None:
    run = run_source(standins.current, tmp_path, {"gpus": 2, "gpu0.lost_from_tick": 1}, ticks=3)
    assert [s["ok"] for s in run.ticks(0)] == [False, False, False]
    assert [s["ok"] for s in run.ticks(1)] == [True, True, True]
    assert len(run.log_lines("GPU 0 stopped answering NVML")) == 1


def test_a_gpu_lost_before_open_is_skipped_and_the_others_are_watched(standins: StandIns, tmp_path: Path) -> None:
    run = run_source(standins.current, tmp_path, {"gpus": 3, "gpu1.lost": 1}, ticks=2)
    assert [gpu["index"] for gpu in run.out["gpus"]] == [0, 2]
    assert [[s["index"] for s in tick] for tick in run.out["ticks"]] == [[0, 2], [0, 2]]
    assert len(run.log_lines("GPU 1 skipped: NVML cannot open it (name: GPU is lost)")) == 1


def test_xid_events_are_counted_and_the_last_one_kept(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 2, "gpu1.xid": "2:79,2:48,4:13"}
    run = run_source(standins.current, tmp_path, config, ticks=5)

    assert [(s["xid_errors"], s["last_xid"]) for s in run.ticks(1)] == [
        (0, None),
        (2, 48),
        (2, 48),
        (3, 13),
        (3, 13),
    ]
    assert [s["xid_errors"] for s in run.ticks(0)] == [0] * 5
    assert len(run.log_lines("GPU 1: XID 79")) == 1
    assert run.calls["gpu1.register_events"] == 1


def test_nvlink_per_link_scopes_are_summed_when_the_all_links_scope_is_refused(
    standins: StandIns, tmp_path: Path
) -> None:
    config = {
        "gpus": 1,
        "gpu0.nvlink_scope": "links",
        "gpu0.nvlink_links": 4,
        "gpu0.nvlink_tx_kib": 4_000,
        "gpu0.nvlink_rx_kib": 8_000,
        "gpu0.nvlink_step_kib": 400,  # each of 4 links reports a quarter
    }
    run = run_source(standins.current, tmp_path, config, ticks=3)
    assert [s["nvlink_tx_bytes"] for s in run.ticks(0)] == [400 * t * 1024 for t in (1, 2, 3)]
    assert [s["nvlink_rx_bytes"] for s in run.ticks(0)] == [400 * t * 1024 for t in (1, 2, 3)]
    assert not run.log_lines("nvlink not available")


def test_nvlink_falls_back_to_gpm_rates_integrated_into_bytes(standins: StandIns, tmp_path: Path) -> None:
    config = {
        "gpus": 1,
        "gpu0.unsupported": "field_values",
        "gpu0.gpm": 1,
        "gpu0.gpm_tx_mibs": 100.0,
        "gpu0.gpm_rx_mibs": 25.5,
    }
    run = run_source(standins.current, tmp_path, config, ticks=3, dt=0.5)
    assert [s["nvlink_tx_bytes"] for s in run.ticks(0)] == [round(100.0 * MIB * 0.5 * t) for t in (1, 2, 3)]
    assert [s["nvlink_rx_bytes"] for s in run.ticks(0)] == [round(25.5 * MIB * 0.5 * t) for t in (1, 2, 3)]
    assert run.calls["gpu0.gpm_sample"] == 1 + 3
    assert not run.log_lines("nvlink not available")


def test_nvlink_is_none_without_links_or_counters(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 2, "gpu0.nvlink_links": 0, "gpu1.unsupported": "field_values"}  # gpu1: no GPM either
    run = run_source(standins.current, tmp_path, config, ticks=2)
    for gpu in (0, 1):
        assert [(s["nvlink_tx_bytes"], s["nvlink_rx_bytes"]) for s in run.ticks(gpu)] == [(None, None)] * 2
        assert len(run.log_lines(f"GPU {gpu}: nvlink not available")) == 1
    assert "no NVLink links" in run.log
    assert run.calls["gpu0.field_values"] == 1  # not asked again each tick


def test_an_older_driver_without_newer_symbols(standins: StandIns, tmp_path: Path) -> None:
    # No nvmlDeviceGetCurrentClocksEventReasons (FunctionNotFound): the older throttle-reasons
    # call answers instead. No GPM symbols: without field values NVLink is None.
    config = {"gpus": 1, **GPU0, "gpu0.unsupported": "field_values"}
    run = run_source(standins.old, tmp_path, config, ticks=3)

    assert [s["throttle_reasons"] for s in run.ticks(0)] == [0x44] * 3
    assert run.calls["gpu0.throttle"] == 3
    assert [s["nvlink_tx_bytes"] for s in run.ticks(0)] == [None] * 3
    assert [s["power_w"] for s in run.ticks(0)] == [350.0, 352.5, 355.0]
    assert len(run.log_lines("GPU 0: nvlink not available")) == 1


def test_missing_library_is_unavailable_with_a_hint(standins: StandIns, tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real NVML library, which the loader would find")
    empty = tmp_path / "nolib"
    empty.mkdir()
    run = run_source(empty, tmp_path, {"gpus": 1})
    assert run.out["error"] == {
        "type": "SourceUnavailable",
        "message": "NVML library not found (hint: install the NVIDIA driver, or run with --source sim)",
        "hint": "install the NVIDIA driver, or run with --source sim",
    }
    assert run.out["probe"] == run.out["error"]["message"]


def test_driver_not_loaded_is_unavailable_with_its_own_hint(standins: StandIns, tmp_path: Path) -> None:
    run = run_source(standins.current, tmp_path, {"init_error": 9})  # NVML_ERROR_DRIVER_NOT_LOADED
    error = run.out["error"]
    assert error["type"] == "SourceUnavailable"
    assert error["message"].startswith("NVIDIA driver not loaded")
    assert "kernel module" in error["hint"]
    assert "--source sim" in error["hint"]
    assert run.out["probe"].startswith("NVIDIA driver not loaded")


def test_no_gpus_is_unavailable_and_probe_says_why(standins: StandIns, tmp_path: Path) -> None:
    run = run_source(standins.current, tmp_path, {"gpus": 0})
    assert run.out["probe"] == "NVML found no GPUs"
    assert run.out["error"]["message"].startswith("NVML found no usable GPUs")
    assert "--source sim" in run.out["error"]["hint"]


def test_nvlink_error_totals_ride_along_with_the_throughput_call(standins: StandIns, tmp_path: Path) -> None:
    config = {
        "gpus": 2,
        "gpu0.nvlink_crc_flit": 5,
        "gpu0.nvlink_crc_data": 2,
        "gpu0.nvlink_replay": 3,
        "gpu0.nvlink_recovery": 1,
        "gpu0.nvlink_error_step": 4,  # flit CRC and replay grow by 4 per field-values call
        "gpu1.nvlink_links": 0,
    }
    run = run_source(standins.current, tmp_path, config, ticks=3)
    errors = [(s["nvlink_crc_errors"], s["nvlink_replay_errors"], s["nvlink_recovery_errors"]) for s in run.ticks(0)]
    # Totals since driver load (like ECC); CRC is flit + data.
    assert errors == [(5 + 2 + 4 * t, 3 + 4 * t, 1) for t in (1, 2, 3)]
    assert run.calls["gpu0.field_values"] == 1 + 3  # no extra call per tick
    assert [s["nvlink_crc_errors"] for s in run.ticks(1)] == [None] * 3  # no links: no errors to count


def test_nvlink_error_totals_when_throughput_is_read_link_by_link(standins: StandIns, tmp_path: Path) -> None:
    # The all-links scope is refused, so throughput is summed over per-link scopes; the error
    # totals (scope ignored) come in the same call.
    config = {"gpus": 1, "gpu0.nvlink_scope": "links", "gpu0.nvlink_links": 4, "gpu0.nvlink_step_kib": 400}
    config |= {"gpu0.nvlink_replay": 9}
    run = run_source(standins.current, tmp_path, config, ticks=2)
    assert [s["nvlink_tx_bytes"] for s in run.ticks(0)] == [400 * t * 1024 for t in (1, 2)]
    assert [s["nvlink_replay_errors"] for s in run.ticks(0)] == [9, 9]
    assert [s["nvlink_crc_errors"] for s in run.ticks(0)] == [0, 0]


def test_memory_used_excludes_reserved_through_the_v2_query(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 1, **GPU0, "gpu0.mem_reserved": 536_870_912}
    run = run_source(standins.current, tmp_path, config, ticks=2)
    assert run.out["gpus"][0]["memory_total_bytes"] == 85_899_345_920
    assert [s["memory_used_bytes"] for s in run.ticks(0)] == [42_949_672_960 - 536_870_912] * 2
    assert [s["memory_total_bytes"] for s in run.ticks(0)] == [85_899_345_920] * 2
    assert not run.log_lines("no v2 memory query")


def test_memory_falls_back_to_v1_on_a_driver_without_v2(standins: StandIns, tmp_path: Path) -> None:
    config = {"gpus": 1, **GPU0, "gpu0.mem_reserved": 536_870_912}
    run = run_source(standins.old, tmp_path, config, ticks=3)
    assert run.out["gpus"][0]["memory_total_bytes"] == 85_899_345_920
    assert [s["memory_used_bytes"] for s in run.ticks(0)] == [42_949_672_960] * 3  # v1: reserved counted as used
    assert len(run.log_lines("GPU 0: no v2 memory query")) == 1  # said once, v2 not tried again
    assert run.calls["gpu0.memory"] == 1 + 3
