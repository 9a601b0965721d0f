"""GPU samples scraped from NVIDIA dcgm-exporter's Prometheus endpoint (the only module that reads its text).

dcgm-exporter (default ``http://localhost:9400/metrics``) publishes one line per GPU and DCGM field.
This source scrapes it with a blocking HTTP GET (the agent calls ``sample`` from a worker thread),
parses the text with ``prometheus_client``'s parser and maps the fields onto ``GpuSample``.

The exporter is a peer, so each scrape goes through ``rackscope.peers.fetch``: one deadline for the
whole scrape (``timeout_s``; the agent passes ``--dcgm-timeout``, at most 0.9 x ``--interval``), a
cap on the decoded page (``MAX_BODY_BYTES``) and a stop flag that ``interrupt`` sets at shutdown. A
scrape that fails in any way fails the sample of every GPU (``ok=False``, no values), so the agent
reports them down and counts the errors instead of repeating the last page as if it were fresh.

=====================================  =====================  ==========================================
dcgm-exporter series                   unit there             ``GpuSample`` field
=====================================  =====================  ==========================================
DCGM_FI_DEV_POWER_USAGE                W                      power_w
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION   mJ since driver load   energy_j since ``open`` (counter delta);
                                                              absent: power integrated over time
DCGM_FI_DEV_FB_USED / _FREE / _RESERVED MiB                   memory_used_bytes; total = FB_TOTAL, else
                                                              used + free + reserved
DCGM_FI_DEV_GPU_UTIL                   %                      utilization (fraction)
DCGM_FI_DEV_SM_CLOCK                   MHz                    sm_clock_mhz
DCGM_FI_DEV_GPU_TEMP                   C                      temperature_c
DCGM_FI_DEV_ENFORCED_POWER_LIMIT,      W                      power_limit_w
  else DCGM_FI_DEV_POWER_MGMT_LIMIT
DCGM_FI_DEV_CLOCKS_EVENT_REASONS,      NVML bitmask           throttle_reasons
  else DCGM_FI_DEV_CLOCK_THROTTLE_REASONS
DCGM_FI_PROF_NVLINK_TX/RX_BYTES        B/s (rate)             nvlink_tx/rx_bytes, integrated over time
  else DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL  1,024,000 B/s, tx+rx   half to each direction (an estimate)
DCGM_FI_PROF_PCIE_TX/RX_BYTES          B/s (rate)             pcie_tx/rx_bytes, integrated over time
  else DCGM_FI_DEV_PCIE_TX/RX_THROUGHPUT   KB/s (rate)
DCGM_FI_DEV_XID_ERRORS                 last XID seen          last_xid; xid_errors counts changes to a
                                                              new non-zero value since ``open``
DCGM_FI_DEV_ECC_SBE/DBE_VOL_TOTAL      count since driver     ecc_corrected / ecc_uncorrected
DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_     count since driver,    nvlink_crc_errors (flit + data)
  COUNT_TOTAL + CRC_DATA_..._TOTAL     all links
DCGM_FI_DEV_NVLINK_REPLAY_/RECOVERY_   count since driver,    nvlink_replay_errors / nvlink_recovery_errors
  ERROR_COUNT_TOTAL                    all links
=====================================  =====================  ==========================================

Facts behind the table (dcgm-exporter ``etc/default-counters.csv`` and ``dcp-metrics-included.csv``,
DCGM ``dcgm_fields.h``, NVML docs, exporter issues):

- ``DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL`` is declared ``counter`` in the CSVs but is a rate: DCGM sums
  the rx and tx KiB/s of all links and divides by 1000, so one unit is 1,024,000 B/s (not 1 MB/s).
  We integrate it like the profiling rates and, having no direction, give half to tx and half to rx
  (right for the symmetric collective traffic of tensor parallel inference, a guess otherwise). The
  per-direction profiling fields, when present, are used instead and nothing is split.
- ``DCGM_FI_DEV_PCIE_TX/RX_THROUGHPUT`` (default CSV, deprecated in DCGM) come from NVML's PCIe
  throughput query: KB/s over a 20 ms window, despite the ``counter`` type in the CSV.
- Rates are integrated with the trapezoidal rule between consecutive successful scrapes, so an
  outage is bridged with the mean of the rates on either side of it.
- dcgm-exporter refreshes its values every 30 s by default (``-c``); scraping faster repeats values.
- MIG: each GPU instance gets its own line (labels ``GPU_I_ID``, ``GPU_I_PROFILE``) and device-wide
  fields (power, energy, temperature, clocks, XID) are repeated on every one. They are taken once per
  physical GPU, never summed. Framebuffer fields are per instance and the instances partition the
  memory, so used (and total) memory is the sum over the GPU's instances; memory not assigned to any
  instance is not in the total, and if any instance lacks the field the GPU's value is ``None``
  rather than a partial sum. ``DCGM_FI_DEV_GPU_UTIL`` is not supported for MIG instances (DCGM
  reports 0), so utilization is ``None`` there.
- Kubernetes adds ``pod``/``namespace``/``container``; a GPU shared by several pods gets one line per
  pod with the same value. These labels are ignored and duplicates taken once.
- Older exporters (and DCGM itself) can emit "blank" sentinels (2**47 for doubles, 2**63 - 16 and
  up for integers) for unsupported fields; those become ``None`` silently. NaN, infinities and
  negative values are invalid readings: ``None`` too, logged once per GPU and field.
- Counters and integrals follow ``rackscope.agent.sources.counters``: the energy counter never goes
  back (a drop below a tenth is a driver restart, a smaller one jitter), rates integrate with the
  trapezoidal rule.

Any field the exporter does not send becomes ``None`` for that tick, never zero. The stock counters
file lacks several of these; ``open`` names, once, every expected field the page lacks and points to
``deploy/dcgm/rackscope-counters.csv``, which enables them all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from rackscope.agent.settings import AgentSettings
from rackscope.agent.sources.base import GpuInfo, GpuSample, OnceLogger, ReadingCheck
from rackscope.agent.sources.counters import Integral, MonotonicCounter, is_valid_reading
from rackscope.clock import Clock
from rackscope.errors import ConfigError, PeerError, SourceError, SourceUnavailable
from rackscope.peers import Target, fetch

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:9400/metrics"
DEFAULT_PATH = "/metrics"
HINT = "is dcgm-exporter running? pass --dcgm-url, or run with --source sim"

MIB = 1024 * 1024
# DCGM computes NVLINK_BANDWIDTH_TOTAL as (rx + tx KiB/s) / 1000: one unit is 1,024,000 B/s.
NVLINK_TOTAL_UNIT_BPS = 1024 * 1000
KB = 1024  # NVML's PCIe throughput "KB/s"
# A full exporter page for 8 GPUs with profiling fields is under 100 KiB; MIG instances and
# Kubernetes pod labels multiply that by tens at most. Parsing costs ~10x the text in memory.
MAX_BODY_BYTES = 16 * MIB
DEFAULT_DEADLINE_S = AgentSettings.dcgm_timeout_s  # a whole scrape; the agent caps it below its interval
SHUTDOWN_DEADLINE_S = 0.5  # a scrape after interrupt(): the last sample, if the exporter is quick

# Fields this source reads.
POWER = "DCGM_FI_DEV_POWER_USAGE"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
FB_TOTAL = "DCGM_FI_DEV_FB_TOTAL"
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"
GPU_TEMP = "DCGM_FI_DEV_GPU_TEMP"
POWER_LIMIT_ENFORCED = "DCGM_FI_DEV_ENFORCED_POWER_LIMIT"
POWER_LIMIT = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
CLOCKS_EVENT_REASONS = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"  # name since DCGM 3.3
CLOCK_THROTTLE_REASONS = "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"  # same field (112), older name
NVLINK_TX = "DCGM_FI_PROF_NVLINK_TX_BYTES"
NVLINK_RX = "DCGM_FI_PROF_NVLINK_RX_BYTES"
NVLINK_TOTAL = "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"
PCIE_TX = "DCGM_FI_PROF_PCIE_TX_BYTES"
PCIE_RX = "DCGM_FI_PROF_PCIE_RX_BYTES"
PCIE_TX_LEGACY = "DCGM_FI_DEV_PCIE_TX_THROUGHPUT"
PCIE_RX_LEGACY = "DCGM_FI_DEV_PCIE_RX_THROUGHPUT"
XID = "DCGM_FI_DEV_XID_ERRORS"
ECC_SBE = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
ECC_DBE = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
NVLINK_CRC_FLIT = "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"
NVLINK_CRC_DATA = "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"
NVLINK_REPLAY = "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"
NVLINK_RECOVERY = "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL"
NVLINK_ERRORS = (NVLINK_CRC_FLIT, NVLINK_CRC_DATA, NVLINK_REPLAY, NVLINK_RECOVERY)

# Fields this source reads (a GPU's other DCGM_FI_ lines only tell that it exists).
FIELDS = frozenset(
    {POWER, ENERGY, FB_USED, FB_FREE, FB_RESERVED, FB_TOTAL, GPU_UTIL, SM_CLOCK, GPU_TEMP, POWER_LIMIT_ENFORCED}
    | {POWER_LIMIT, CLOCKS_EVENT_REASONS, CLOCK_THROTTLE_REASONS, NVLINK_TX, NVLINK_RX, NVLINK_TOTAL, PCIE_TX}
    | {PCIE_RX, PCIE_TX_LEGACY, PCIE_RX_LEGACY, XID, ECC_SBE, ECC_DBE, *NVLINK_ERRORS}
)
# What a page should carry for every GPU reading to be filled: each entry is satisfied by any one of
# its names (newer name first). Fallbacks that lose precision (NVLINK_BANDWIDTH_TOTAL, the legacy PCIe
# throughput, FB_TOTAL) are not asked for. deploy/dcgm/rackscope-counters.csv enables all of them.
EXPECTED: tuple[tuple[str, ...], ...] = (
    (POWER,),
    (ENERGY,),
    (FB_USED,),
    (FB_FREE,),
    (FB_RESERVED,),
    (GPU_UTIL,),
    (SM_CLOCK,),
    (GPU_TEMP,),
    (POWER_LIMIT_ENFORCED, POWER_LIMIT),
    (CLOCKS_EVENT_REASONS, CLOCK_THROTTLE_REASONS),
    (NVLINK_TX,),
    (NVLINK_RX,),
    (PCIE_TX,),
    (PCIE_RX,),
    (XID,),
    (ECC_SBE,),
    (ECC_DBE,),
    *((name,) for name in NVLINK_ERRORS),
)
COUNTERS_CSV = "deploy/dcgm/rackscope-counters.csv"
# DCGM stores these as doubles; every other field above is an int64.
_DOUBLE_FIELDS = frozenset({POWER, POWER_LIMIT_ENFORCED, POWER_LIMIT})
_FP64_BLANK = float(2**47)  # DCGM_FP64_BLANK; the other double sentinels sit just above it
_INT64_BLANK = 0x7FFFFFFFFFFFFFF0  # DCGM_INT64_BLANK; NOT_FOUND, NOT_SUPPORTED... follow it

# Lines that carry these belong to NVSwitch or per-link entities, not to a GPU as a whole.
_NON_GPU_LABELS = frozenset({"nvswitch", "nvlink"})

_REQUEST_HEADERS = {
    # promhttp negotiates: ask for the classic text format, not OpenMetrics or protobuf.
    "Accept": "text/plain;version=0.0.4;q=1.0, */*;q=0.1",
    "User-Agent": "rackscope-agent",
}


# --------------------------------------------------------------------------- parsing


@dataclass
class _GpuLines:
    """Everything one scrape said about one physical GPU."""

    index: int
    uuid: str | None = None
    model: str | None = None
    pci_bus_id: str | None = None
    whole: dict[str, float] = field(default_factory=dict)  # lines without a MIG instance
    by_instance: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> GPU_I_ID -> value
    instances: dict[str, str] = field(default_factory=dict)  # GPU_I_ID -> GPU_I_PROFILE

    @property
    def mig(self) -> bool:
        return bool(self.instances)

    def device_value(self, name: str) -> float | None:
        """A device-wide field: one value per physical GPU (MIG repeats it on every instance)."""
        if name in self.whole:
            return self.whole[name]
        per_instance = self.by_instance.get(name)
        if not per_instance:
            return None
        return per_instance[min(per_instance, key=_instance_order)]

    def partitioned_sum(self, name: str) -> float | None:
        """A per-instance field (framebuffer): the whole-GPU line, else the sum over all instances."""
        if name in self.whole:
            return self.whole[name]
        per_instance = self.by_instance.get(name)
        if not per_instance or per_instance.keys() != self.instances.keys():
            return None  # a partial sum would understate the GPU
        invalid = [v for v in per_instance.values() if not is_valid_reading(v)]
        return invalid[0] if invalid else sum(per_instance.values())  # no valid-looking sum of bad parts


def _instance_order(instance_id: str) -> tuple[int, str]:
    return (int(instance_id), "") if instance_id.isdigit() else (1 << 31, instance_id)


@dataclass
class Scrape:
    """One parsed exporter page: GPUs by index plus node-wide labels."""

    gpus: dict[int, _GpuLines]
    hostname: str | None = None
    driver_version: str | None = None


def _clean_value(name: str, raw: float) -> float | None:
    """``None`` for DCGM's blank sentinels (field not supported). Anything else is kept, NaN and
    negatives included: those are invalid readings, logged by the GPU they belong to."""
    value = float(raw)
    if not math.isfinite(value):
        return value
    if name in _DOUBLE_FIELDS:
        return None if value >= _FP64_BLANK else value
    return None if raw >= _INT64_BLANK else value


def parse_exposition(text: str) -> Scrape:
    """Group the ``DCGM_FI_*`` lines of an exporter page by GPU. Raises ``ValueError`` on text that
    is not the Prometheus exposition format."""
    gpus: dict[int, _GpuLines] = {}
    scrape = Scrape(gpus)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser renames samples of ``counter`` families to ``<family>_total``.
            name = sample.name if sample.name in FIELDS else family.name
            if not name.startswith("DCGM_FI_"):
                continue
            labels = sample.labels
            if _NON_GPU_LABELS & labels.keys():
                continue
            gpu_label = labels.get("gpu", "")
            if not gpu_label.isdigit():
                continue
            index = int(gpu_label)
            gpu = gpus.get(index)
            if gpu is None:
                gpu = gpus[index] = _GpuLines(index)
            gpu.uuid = gpu.uuid or labels.get("UUID") or labels.get("uuid") or None
            gpu.model = gpu.model or labels.get("modelName") or None
            gpu.pci_bus_id = gpu.pci_bus_id or labels.get("pci_bus_id") or None
            # ``Hostname`` until 2026, ``hostname`` since.
            scrape.hostname = scrape.hostname or labels.get("hostname") or labels.get("Hostname") or None
            scrape.driver_version = scrape.driver_version or labels.get("DCGM_FI_DRIVER_VERSION") or None
            instance = labels.get("GPU_I_ID") or None  # some versions send GPU_I_ID="" on whole GPUs
            if instance is not None:
                gpu.instances.setdefault(instance, labels.get("GPU_I_PROFILE", ""))
            if name not in FIELDS:
                continue  # a DCGM field we do not map still tells us the GPU exists
            value = _clean_value(name, sample.value)
            if value is None:
                continue
            # setdefault: a GPU shared by several pods repeats the same value once per pod.
            if instance is None:
                gpu.whole.setdefault(name, value)
            else:
                gpu.by_instance.setdefault(name, {}).setdefault(instance, value)
    return scrape


# --------------------------------------------------------------------------- per-GPU state


class _XidTracker:
    """dcgm-exporter shows only the last XID; a change to a new non-zero value is one more event.
    (The same XID twice in a row cannot be told apart from no new XID.)"""

    def __init__(self) -> None:
        self.count = 0
        self._last: int | None = None

    def add(self, value: float | None) -> tuple[int | None, int | None]:
        if value is None:
            return None, None
        xid = int(value)
        if self._last is not None and xid not in (self._last, 0):
            self.count += 1
        self._last = xid
        return self.count, xid


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


class _GpuState:
    """What one GPU's samples need to remember between scrapes."""

    def __init__(self, lines: _GpuLines, once: OnceLogger, check: ReadingCheck) -> None:
        self.index = i = lines.index
        self.uuid = lines.uuid or lines.pci_bus_id or f"dcgm-gpu-{lines.index}"
        self._once = once
        self._check = check
        self.energy_method = "counter" if lines.device_value(ENERGY) is not None else "integrated"
        if self.energy_method == "integrated":
            once.warn(("energy", i), "GPU %d: dcgm-exporter sends no %s; integrating power instead", i, ENERGY)
        self._energy_counter = MonotonicCounter(f"GPU {i} {ENERGY} (mJ)")
        self._energy_integral = Integral(f"GPU {i} {POWER} integrated (W)")
        self._nvlink_tx = Integral(f"GPU {i} NVLink tx (B/s)")
        self._nvlink_rx = Integral(f"GPU {i} NVLink rx (B/s)")
        self._pcie_tx = Integral(f"GPU {i} PCIe tx (B/s)")
        self._pcie_rx = Integral(f"GPU {i} PCIe rx (B/s)")
        self._nvlink_field = ""  # which field the NVLink integrals follow ("prof" or "total")
        self._pcie_field = ""  # "prof" or "legacy"
        self._ecc_corrected = MonotonicCounter(f"GPU {i} {ECC_SBE}", keep_first=True)
        self._ecc_uncorrected = MonotonicCounter(f"GPU {i} {ECC_DBE}", keep_first=True)
        # Since driver load, like the ECC totals (keep_first): alerts look at increases.
        self._nvlink_errors = {name: MonotonicCounter(f"GPU {i} {name}", keep_first=True) for name in NVLINK_ERRORS}
        self._xid = _XidTracker()

    def _value(self, lines: _GpuLines, name: str) -> float | None:
        """A device-wide field, ``None`` when absent or invalid."""
        return self._check(self.index, name, lines.device_value(name))

    def _sum(self, lines: _GpuLines, name: str) -> float | None:
        """A per-instance (framebuffer) field summed over the GPU, ``None`` when absent or invalid."""
        return self._check(self.index, name, lines.partitioned_sum(name))

    def info(self, lines: _GpuLines) -> GpuInfo:
        memory_total_bytes, _ = self._memory(lines)
        return GpuInfo(
            index=self.index,
            uuid=self.uuid,
            model=lines.model or "unknown",
            memory_total_bytes=memory_total_bytes,
            power_limit_w=self._power_limit(lines),
            simulated=False,
        )

    def update(self, lines: _GpuLines, now_s: float, wall_s: float) -> GpuSample:
        power_w = self._value(lines, POWER)
        if self.energy_method == "counter":
            # The counter checks its own readings (an invalid one is logged once and is None).
            energy_mj = self._energy_counter.update(lines.device_value(ENERGY))
            energy_j = None if energy_mj is None else energy_mj / 1000.0
        else:
            energy_j = self._energy_integral.update(power_w, now_s)
        memory_total_bytes, memory_used_bytes = self._memory(lines)
        nvlink_tx, nvlink_rx = self._links(lines, now_s)
        pcie_tx, pcie_rx = self._pcie(lines, now_s)
        xid_errors, last_xid = self._xid.add(self._value(lines, XID))
        throttle = self._value(lines, CLOCKS_EVENT_REASONS)
        if throttle is None:
            throttle = self._value(lines, CLOCK_THROTTLE_REASONS)
        link_errors = {name: counter.update(lines.device_value(name)) for name, counter in self._nvlink_errors.items()}
        crc_parts = [v for v in (link_errors[NVLINK_CRC_FLIT], link_errors[NVLINK_CRC_DATA]) if v is not None]
        return GpuSample(
            index=self.index,
            timestamp_s=wall_s,
            power_w=power_w,
            energy_j=energy_j,
            energy_method=self.energy_method,
            power_limit_w=self._power_limit(lines),
            memory_used_bytes=memory_used_bytes,
            memory_total_bytes=memory_total_bytes,
            utilization=self._utilization(lines),
            sm_clock_mhz=self._value(lines, SM_CLOCK),
            temperature_c=self._value(lines, GPU_TEMP),
            throttle_reasons=_as_int(throttle),
            nvlink_tx_bytes=_as_int(nvlink_tx),
            nvlink_rx_bytes=_as_int(nvlink_rx),
            pcie_tx_bytes=_as_int(pcie_tx),
            pcie_rx_bytes=_as_int(pcie_rx),
            xid_errors=xid_errors,
            last_xid=last_xid,
            ecc_corrected=_as_int(self._ecc_corrected.update(lines.device_value(ECC_SBE))),
            ecc_uncorrected=_as_int(self._ecc_uncorrected.update(lines.device_value(ECC_DBE))),
            # Flit and data CRC errors are one error.type; a page with only one of them counts that one.
            nvlink_crc_errors=_as_int(sum(crc_parts)) if crc_parts else None,
            nvlink_replay_errors=_as_int(link_errors[NVLINK_REPLAY]),
            nvlink_recovery_errors=_as_int(link_errors[NVLINK_RECOVERY]),
        )

    def _power_limit(self, lines: _GpuLines) -> float | None:
        limit = self._value(lines, POWER_LIMIT_ENFORCED)
        return limit if limit is not None else self._value(lines, POWER_LIMIT)

    def _memory(self, lines: _GpuLines) -> tuple[int | None, int | None]:
        """(total, used) in bytes."""
        used_mib = self._sum(lines, FB_USED)
        total_mib = self._sum(lines, FB_TOTAL)
        if total_mib is None:
            free_mib = self._sum(lines, FB_FREE)
            # Exporters before FB_RESERVED existed counted the reserved memory as used.
            reserved_mib = self._sum(lines, FB_RESERVED)
            if reserved_mib is None and lines.partitioned_sum(FB_RESERVED) is not None:
                free_mib = None  # sent but invalid: no total rather than a wrong one
            if used_mib is not None and free_mib is not None:
                total_mib = used_mib + free_mib + (reserved_mib or 0.0)
        return (
            None if total_mib is None else int(total_mib * MIB),
            None if used_mib is None else int(used_mib * MIB),
        )

    def _utilization(self, lines: _GpuLines) -> float | None:
        i = self.index
        if lines.mig and GPU_UTIL not in lines.whole:
            self._once.warn(("util-mig", i), "GPU %d is in MIG mode: DCGM reports no %s for MIG instances", i, GPU_UTIL)
            return None
        percent = self._check(i, GPU_UTIL, lines.whole.get(GPU_UTIL))
        if percent is None:
            return None
        if percent > 100.0:
            self._once.warn(("util-range", i), "GPU %d: ignoring %s=%s (out of 0-100)", i, GPU_UTIL, percent)
            return None
        return percent / 100.0

    def _links(self, lines: _GpuLines, now_s: float) -> tuple[float | None, float | None]:
        tx_bps = lines.device_value(NVLINK_TX)
        rx_bps = lines.device_value(NVLINK_RX)
        if tx_bps is not None or rx_bps is not None:
            self._follow_nvlink("prof")
            return self._nvlink_tx.update(tx_bps, now_s), self._nvlink_rx.update(rx_bps, now_s)
        total_units = self._value(lines, NVLINK_TOTAL)
        if total_units is None:
            return None, None
        message = "GPU %d: no %s/%s; splitting %s evenly between tx and rx"
        self._once.warn(("nvlink-split", self.index), message, self.index, NVLINK_TX, NVLINK_RX, NVLINK_TOTAL)
        self._follow_nvlink("total")
        half_bps = total_units * NVLINK_TOTAL_UNIT_BPS / 2.0
        return self._nvlink_tx.update(half_bps, now_s), self._nvlink_rx.update(half_bps, now_s)

    def _follow_nvlink(self, name: str) -> None:
        # A switch of source field (profiling <-> total) starts afresh instead of mixing the two.
        if name != self._nvlink_field:
            self._nvlink_field = name
            self._nvlink_tx.restart()
            self._nvlink_rx.restart()

    def _pcie(self, lines: _GpuLines, now_s: float) -> tuple[float | None, float | None]:
        tx_bps = lines.device_value(PCIE_TX)
        rx_bps = lines.device_value(PCIE_RX)
        field_name = "prof"
        if tx_bps is None and rx_bps is None:
            tx_kbps = lines.device_value(PCIE_TX_LEGACY)
            rx_kbps = lines.device_value(PCIE_RX_LEGACY)
            tx_bps = None if tx_kbps is None else tx_kbps * KB
            rx_bps = None if rx_kbps is None else rx_kbps * KB
            field_name = "legacy"
        if field_name != self._pcie_field:
            self._pcie_field = field_name
            self._pcie_tx.restart()
            self._pcie_rx.restart()
        return self._pcie_tx.update(tx_bps, now_s), self._pcie_rx.update(rx_bps, now_s)


# --------------------------------------------------------------------------- the source


class DcgmSource:
    """``GpuSource`` reading a dcgm-exporter endpoint.

    ``timeout_s`` bounds each whole scrape and ``max_bytes`` its decoded page. ``clock`` is
    monotonic time used to integrate rates: a ``rackscope.clock.Clock`` or a
    ``time.monotonic``-like callable. ``wall_clock`` stamps the samples.
    """

    name = "dcgm"
    simulated = False

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = DEFAULT_DEADLINE_S,
        clock: Clock | Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the dcgm-exporter timeout must be positive, not {timeout_s}")
        if max_bytes < 1:
            raise ConfigError(f"the dcgm-exporter page cap must be positive, not {max_bytes}")
        self.url = url
        self._target = _target(url)
        self._deadline_s = timeout_s
        self._max_bytes = max_bytes
        if clock is None:
            self._now: Callable[[], float] = time.monotonic
        elif callable(clock):
            self._now = clock
        else:
            self._now = clock.now
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._stop = threading.Event()  # aborts the scrape in flight (interrupt)
        self._stopping = False
        self._once = OnceLogger(log)
        self._check = ReadingCheck(log)
        self._gpus: dict[int, _GpuState] = {}
        self._opened = False
        self._outage: str | None = None
        # Node facts from the exporter's labels, for run records (None until open).
        self.hostname: str | None = None
        self.driver_version: str | None = None
        self.mig_profiles: dict[int, dict[str, str]] = {}  # GPU index -> GPU_I_ID -> GPU_I_PROFILE

    def _scrape(self) -> tuple[Scrape, float]:
        what = self._target.what
        stopping = self._stopping
        if stopping and self._outage is not None:
            raise SourceError(self._outage)  # shutting down: a failing exporter is not waited on again
        try:
            response = fetch(
                self._target,
                deadline_s=min(self._deadline_s, SHUTDOWN_DEADLINE_S) if stopping else self._deadline_s,
                max_bytes=self._max_bytes,
                headers=_REQUEST_HEADERS,
                stop=None if stopping else self._stop,
            )
        except PeerError as exc:
            raise SourceError(f"dcgm-exporter at {exc}") from exc
        if response.status != 200:
            raise SourceError(f"dcgm-exporter at {what} answered HTTP {response.status} {response.reason}")
        now_s = self._now()
        try:
            return parse_exposition(response.body.decode("utf-8", errors="replace")), now_s
        except ValueError as exc:
            raise SourceError(f"{what} did not answer in the Prometheus text format: {exc}") from exc

    def is_available(self) -> bool:
        """Whether a dcgm-exporter with at least one GPU answers at ``url`` (one scrape, no state)."""
        try:
            scrape, _ = self._scrape()
        except SourceError as exc:
            log.debug("dcgm-exporter probe failed: %s", exc)
            return False
        return bool(scrape.gpus)

    def open(self) -> list[GpuInfo]:
        with self._lock:
            self._stop.clear()
            self._stopping = False
            try:
                scrape, now_s = self._scrape()
            except SourceError as exc:
                raise SourceUnavailable(str(exc), hint=HINT) from exc
            if not scrape.gpus:
                raise SourceUnavailable(
                    f"{self._target.what} answered but sent no DCGM_FI_ series with a gpu label: "
                    "is it a dcgm-exporter?",
                    hint=HINT,
                )
            self._gpus = {}
            infos = []
            wall_s = self._wall()
            for index in sorted(scrape.gpus):
                lines = scrape.gpus[index]
                state = _GpuState(lines, self._once, self._check)
                state.update(lines, now_s, wall_s)  # first readings: counters and integrals start here
                self._gpus[index] = state
                infos.append(state.info(lines))
            self.hostname = scrape.hostname
            self.driver_version = scrape.driver_version
            self.mig_profiles = {i: dict(g.instances) for i, g in scrape.gpus.items() if g.mig}
            self._warn_missing(scrape)
            self._opened = True
            self._outage = None
            log.info(
                "dcgm-exporter at %s: %d GPU(s) on %s", self._target.what, len(infos), self.hostname or "unknown host"
            )
            return infos

    def sample(self) -> list[GpuSample]:
        with self._lock:
            if not self._opened:
                raise SourceError("DcgmSource.sample() called before open() or after close()")
            wall_s = self._wall()
            try:
                scrape, now_s = self._scrape()
            except SourceError as exc:
                if self._outage is None:
                    log.warning("%s; marking every GPU's sample as failed until it answers", exc)
                self._outage = str(exc)
                return [GpuSample(index=i, timestamp_s=wall_s, ok=False, error=str(exc)) for i in self._gpus]
            if self._outage is not None:
                log.info("dcgm-exporter at %s answers again", self._target.what)
                self._outage = None
            samples = []
            for index, state in self._gpus.items():
                lines = scrape.gpus.get(index)
                if lines is None:
                    error = f"GPU {index} ({state.uuid}) is missing from the dcgm-exporter page at {self._target.what}"
                    self._once.warn(("missing", index), "%s", error)
                    samples.append(GpuSample(index=index, timestamp_s=wall_s, ok=False, error=error))
                    continue
                samples.append(state.update(lines, now_s, wall_s))
            for index in scrape.gpus.keys() - self._gpus.keys():
                self._once.warn(("new", index), "GPU %d appeared after start; it is ignored until restart", index)
            return samples

    def _warn_missing(self, scrape: Scrape) -> None:
        """One line naming every expected field that no GPU of the page carries, so an operator can
        fix the exporter's counters file once instead of discovering gaps reading by reading."""
        sent = set().union(*(set(g.whole) | set(g.by_instance) for g in scrape.gpus.values()))
        missing = [names[0] for names in EXPECTED if not sent & set(names)]
        if missing:
            self._once.warn(
                ("missing-fields",),
                "dcgm-exporter at %s does not send %s; those readings stay empty. Run it with the "
                "counters file %s (dcgm-exporter -f, or the GPU Operator's dcgmExporter.config ConfigMap)",
                self._target.what,
                ", ".join(missing),
                COUNTERS_CSV,
            )

    def interrupt(self) -> None:
        # No lock: the scrape in flight holds it, and this is what makes it let go.
        self._stopping = True
        self._stop.set()

    def close(self) -> None:
        self.interrupt()
        with self._lock:
            self._opened = False


def _target(url: str) -> Target:
    """The exporter's URL; a bare host (or "/") means its ``/metrics`` page."""
    try:
        target = Target.parse(url, DEFAULT_PATH)
    except ValueError:
        raise ConfigError(f"--dcgm-url must be an http:// or https:// URL such as {DEFAULT_URL}, not {url!r}") from None
    if target.path == "/" or target.path.startswith("/?"):
        target = dataclasses.replace(
            target, path=DEFAULT_PATH + target.path[1:], what=target.what.removesuffix("/") + DEFAULT_PATH
        )
    return target
