"""Counter semantics every GPU source shares: a hardware counter made monotonic, and a rate integrated over time.

Prometheus treats any decrease of a ``_total`` series as a counter reset and adds the new value
to ``rate()``/``increase()``, so one step back of an exported counter costs a whole counter's
worth of joules or bytes on every dashboard. Sources therefore never pass a hardware counter
through: they feed its readings to ``MonotonicCounter``, whose total only moves forward.

The rule for a reading below the previous one (``RESET_FRACTION``):

- below a tenth of the previous reading: the counter restarted (driver reload, GPU reset). What
  was counted is kept and counting goes on from the new zero: the new reading is added whole.
  A restarted counter reads close to zero (one sampling interval of energy or traffic), a tenth
  of a counter that ran for even a minute; a wrong "restart" adds less than a tenth of it.
- anything smaller is jitter (readings taken out of order, an exporter mixing two reads, a
  hostile page): ignored and logged once. The total does not move, and the high-water mark
  stays, so the counter resumes counting only once it passes its earlier reading again.
- negative, NaN or infinite: not a reading at all. The sample carries ``None`` for the field,
  logged once; the counter's state is untouched, so the next valid reading continues it.

``Integral`` turns a rate (W, B/s) into a running total (J, B) with the trapezoidal rule. It is
the one integrator for energy where a GPU has no energy counter and for link traffic that an
exporter only gives as a rate. Trapezoid rather than "latest reading x interval": the readings
are samples of a curve at the sampling instants (dcgm-exporter refreshes them every 30 s by
default; NVML power is at most a one-second average), so the trapezoid is exact for a linear
ramp between two readings and has no lag, while "latest x interval" charges a step of load to
the whole interval before it was measured. For constant power both give the same joules; with
a one-second average read once a second, they differ by half the change between readings,
which cancels over a run.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

RESET_FRACTION = 0.1


def is_valid_reading(value: float) -> bool:
    """Every quantity rackscope reads from a GPU (power, energy, bytes, counts, temperatures,
    clocks, fractions) is finite and non-negative; anything else is a broken reading."""
    return math.isfinite(value) and value >= 0


class MonotonicCounter:
    """A cumulative hardware counter as a total that never decreases (rules in the module doc).

    ``total`` counts from the first reading (0 there), or, with ``keep_first``, includes the
    first reading itself (error counts, which operators compare with ``nvidia-smi``). ``what``
    names the counter in log lines, e.g. ``"GPU 0 energy (mJ)"``."""

    def __init__(self, what: str, *, keep_first: bool = False) -> None:
        self.what = what
        self.total = 0.0
        self.resets = 0
        self._keep_first = keep_first
        self._last: float | None = None  # the high-water mark of the current counting run
        self._warned_jitter = False
        self._warned_invalid = False

    @property
    def started(self) -> bool:
        return self._last is not None

    def update(self, reading: float | None) -> float | None:
        """The total after ``reading``; ``None`` when there is no valid reading this time."""
        if reading is None:
            return None
        if not is_valid_reading(reading):
            if not self._warned_invalid:
                self._warned_invalid = True
                log.warning("%s: invalid reading %r; reported as missing", self.what, reading)
            return None
        last = self._last
        if last is None:
            self.total = reading if self._keep_first else 0.0
            self._last = reading
        elif reading >= last:
            self.total += reading - last
            self._last = reading
        elif reading < RESET_FRACTION * last:
            self.resets += 1
            log.warning("%s restarted (%r after %r); counting on from its new zero", self.what, reading, last)
            self.total += reading
            self._last = reading
        elif not self._warned_jitter:
            self._warned_jitter = True
            log.warning(
                "%s went back from %r to %r; ignored (only a drop below %g of the last reading is a restart)",
                self.what,
                last,
                reading,
                RESET_FRACTION,
            )
        return self.total


class Integral:
    """A rate integrated over time with the trapezoidal rule (why trapezoid: module doc).

    ``update(rate, now_s)`` adds the area since the previous valid reading and returns the
    total; a missing or invalid reading returns ``None`` and leaves the previous point in place,
    so a gap is bridged with the mean of the readings on either side of it. ``restart()``
    forgets the previous point (the rate now comes from another field) and keeps the total."""

    def __init__(self, what: str, start: float = 0.0) -> None:
        self.what = what
        self.total = start
        self._rate: float | None = None
        self._t: float | None = None
        self._warned_invalid = False

    def update(self, rate: float | None, now_s: float) -> float | None:
        if rate is None:
            return None
        if not is_valid_reading(rate):
            if not self._warned_invalid:
                self._warned_invalid = True
                log.warning("%s: invalid reading %r; reported as missing", self.what, rate)
            return None
        if self._rate is not None and self._t is not None and now_s > self._t:
            self.total += (self._rate + rate) / 2.0 * (now_s - self._t)
        if self._t is None or now_s >= self._t:
            self._rate, self._t = rate, now_s
        return self.total

    def restart(self) -> None:
        self._rate = self._t = None
