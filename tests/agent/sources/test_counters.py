"""The counter rules every source shares, as tables: readings in, exported totals out."""

from __future__ import annotations

import logging
import math

import pytest

from rackscope.agent.sources.base import GpuSample, ReadingCheck
from rackscope.agent.sources.counters import RESET_FRACTION, Integral, MonotonicCounter

NAN, INF = math.nan, math.inf

COUNTER_CASES: dict[str, tuple[list[float | None], list[float | None]]] = {
    "counts from the first reading": ([100, 150, 150, 400], [0, 50, 50, 300]),
    "small steps back are jitter": ([1000, 999.5, 999, 1002], [0, 0, 0, 2]),
    "a hostile 0.5 back each time never moves": ([5000, 4999.5, 4999, 4998.5], [0, 0, 0, 0]),
    "below a tenth is a restart": ([1000, 99, 150], [0, 99, 150]),
    "exactly a tenth is still jitter": ([1000, 100, 1010], [0, 0, 10]),
    "back to zero is a restart": ([1000, 0, 10], [0, 0, 10]),
    "restart judged against the high-water mark": ([1000, 990, 50, 60], [0, 0, 50, 60]),
    "two restarts": ([500, 700, 10, 400, 3], [0, 200, 210, 600, 603]),
    "not reported: nothing moves": ([100, None, 120], [0, None, 20]),
    "negative, NaN and infinite are invalid": ([100, -5, NAN, INF, -INF, 130], [0, None, None, None, None, 30]),
    "an invalid first reading does not start it": ([NAN, -1, 100, 110], [None, None, 0, 10]),
    "a negative reading is not a restart": ([1000, -1000, 1001], [0, None, 1]),
}


@pytest.mark.parametrize(("readings", "totals"), COUNTER_CASES.values(), ids=COUNTER_CASES.keys())
def test_monotonic_counter(readings: list[float | None], totals: list[float | None]) -> None:
    counter = MonotonicCounter("GPU 0 energy (mJ)")
    assert [counter.update(r) for r in readings] == [None if t is None else pytest.approx(t) for t in totals]


def test_monotonic_counter_can_include_its_first_reading() -> None:
    counter = MonotonicCounter("GPU 0 corrected ECC errors", keep_first=True)
    assert [counter.update(r) for r in (3, 3, 5, 4, 0, 1)] == [3, 3, 5, 5, 5, 6]


def test_the_reset_threshold_is_a_tenth() -> None:
    assert RESET_FRACTION == 0.1


def test_jitter_and_invalid_readings_are_logged_once_restarts_every_time(caplog: pytest.LogCaptureFixture) -> None:
    counter = MonotonicCounter("GPU 3 energy (mJ)")
    with caplog.at_level(logging.WARNING):
        for reading in (1000, 999, 998, -1, NAN, 1000, 10, 5, 2000, 1):
            counter.update(reading)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GPU 3 energy (mJ) went back from 1000 to 999" in m for m in messages) == 1
    assert sum("went back" in m for m in messages) == 1
    assert sum("invalid reading -1" in m for m in messages) == 1
    assert sum("invalid reading" in m for m in messages) == 1
    assert sum("restarted" in m for m in messages) == 2
    assert counter.resets == 2


INTEGRAL_CASES: dict[str, tuple[list[tuple[float | None, float]], list[float | None]]] = {
    "constant power": ([(100, 0), (100, 1), (100, 3)], [0, 100, 300]),
    "a ramp is exact": ([(0, 0), (100, 1), (200, 2)], [0, 50, 200]),
    "a step is shared by its interval": ([(100, 0), (300, 1), (300, 2)], [0, 200, 500]),
    "a gap is bridged with the mean of both sides": ([(100, 0), (None, 1), (300, 2)], [0, None, 400]),
    "invalid readings are skipped": ([(100, 0), (-5, 1), (NAN, 1.5), (INF, 1.7), (100, 2)], [0, None, None, None, 200]),
    "a second reading at the same time replaces the first": ([(100, 0), (200, 0), (200, 1)], [0, 0, 200]),
    "a reading from the past adds nothing": ([(100, 5), (100, 4), (100, 6)], [0, 0, 100]),
}


@pytest.mark.parametrize(("readings", "totals"), INTEGRAL_CASES.values(), ids=INTEGRAL_CASES.keys())
def test_integral(readings: list[tuple[float | None, float]], totals: list[float | None]) -> None:
    integral = Integral("GPU 0 power (W)")
    expected = [None if v is None else pytest.approx(v) for v in totals]
    assert [integral.update(rate, t) for rate, t in readings] == expected


def test_integral_starts_from_a_carried_total_and_restarts_without_bridging() -> None:
    integral = Integral("GPU 0 power (W)", start=10.0)
    assert integral.update(100, 0) == 10.0
    assert integral.update(100, 1) == 110.0
    integral.restart()  # the rate now comes from another field: no area across the switch
    assert integral.update(300, 2) == 110.0
    assert integral.update(300, 3) == 410.0


def test_reading_check_turns_invalid_fields_into_none_once_per_gpu_and_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check = ReadingCheck(logging.getLogger("test"))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            sample = GpuSample(index=1, timestamp_s=0.0, power_w=-3.0, temperature_c=NAN, utilization=0.5, xid_errors=0)
            check.sweep(sample)
            assert (sample.power_w, sample.temperature_c, sample.utilization, sample.xid_errors) == (None, None, 0.5, 0)
        assert check(2, "power_w", INF) is None
        assert check(2, "power_w", 0.0) == 0.0
        assert check(2, "power_w", None) is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "GPU 1: invalid reading power_w=-3.0; reported as missing",
        "GPU 1: invalid reading temperature_c=nan; reported as missing",
        "GPU 2: invalid reading power_w=inf; reported as missing",
    ]
