"""The NVML GPU source: power, energy, memory, clocks, NVLink traffic and errors through pynvml.

This is the only module that imports ``pynvml`` (package nvidia-ml-py). It loads it lazily so
that a missing package or driver library is reported by ``probe()`` / ``open()`` as
``SourceUnavailable`` with a hint, never as an import error.

Failures come in tiers:
- NVML cannot start (no library, no driver): ``open()`` raises ``SourceUnavailable``.
- One GPU does not support one field: that field is ``None`` for that GPU, logged once, and
  not asked again.
- One GPU stops answering (GPU lost, reset required, ...): its sample has ``ok=False`` and
  ``error`` set; the other GPUs carry on, and it is asked again next tick in case it recovers.
- One reading is impossible (negative, NaN, infinite): that field is ``None``, logged once.

Hardware counters (energy, NVLink bytes, ECC counts) follow ``rackscope.agent.sources.counters``:
they never go back, a drop below a tenth is a driver restart and a smaller one jitter. Where a GPU
has no energy counter, power is integrated with the trapezoidal rule.

Memory comes from the v2 query, whose used memory excludes what the driver reserves (as
dcgm-exporter's ``FB_USED`` does), else from v1 on drivers without it. NVLink errors are the
driver's totals over all links (field values 38/45/52/59: CRC flit, CRC data, replay, recovery),
read in the same field-values call as the NVLink throughput.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rackscope.agent.sources import nvml_h
from rackscope.agent.sources.base import GpuInfo, GpuSample, OnceLogger, ReadingCheck
from rackscope.agent.sources.counters import Integral, MonotonicCounter
from rackscope.clock import Clock, WallClock
from rackscope.errors import SourceError, SourceUnavailable

log = logging.getLogger(__name__)

SIM_HINT = "run with --source sim"

_BYTES_PER_KIB = 1024
_BYTES_PER_MIB = 1024 * 1024
_NVLINK_ERRORS = "nvlink_errors"  # what the NVLink error totals are called in logs and gpu.unsupported
_MAX_EVENTS_PER_TICK = 64  # bounds the drain loop if a driver keeps reporting events

_CLOCK_EVENTS_FN = "nvmlDeviceGetCurrentClocksEventReasons"
_THROTTLE_FN = "nvmlDeviceGetCurrentClocksThrottleReasons"  # the name before driver r535


class _GpuNotAnswering(SourceError):
    """Raised inside a tick when one GPU fails; ``sample`` turns it into ``ok=False``."""


def _load_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise SourceUnavailable("pynvml is not installed", hint=f"pip install nvidia-ml-py, or {SIM_HINT}") from exc


def _init(nv: Any) -> None:
    """``nvmlInit`` with its failures translated into ``SourceUnavailable``."""
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        code = exc.value
        if code == nvml_h.ERR_LIBRARY_NOT_FOUND:
            raise SourceUnavailable("NVML library not found", hint=f"install the NVIDIA driver, or {SIM_HINT}") from exc
        if code == nvml_h.ERR_DRIVER_NOT_LOADED:
            raise SourceUnavailable(
                "NVIDIA driver not loaded",
                hint=f"load the nvidia kernel module (nvidia-smi should list the GPUs), or {SIM_HINT}",
            ) from exc
        if code == nvml_h.ERR_LIB_RM_VERSION_MISMATCH:
            raise SourceUnavailable(
                "NVML library and NVIDIA kernel driver versions differ",
                hint=f"reload the nvidia kernel module or reboot after a driver upgrade, or {SIM_HINT}",
            ) from exc
        if code == nvml_h.ERR_NO_PERMISSION:
            raise SourceUnavailable(
                "no permission to use NVML", hint=f"check access to the /dev/nvidia* devices, or {SIM_HINT}"
            ) from exc
        raise SourceUnavailable(f"NVML failed to start: {exc}", hint=f"check nvidia-smi, or {SIM_HINT}") from exc


def _shutdown(nv: Any) -> None:
    try:
        nv.nvmlShutdown()
    except nv.NVMLError as exc:
        log.warning("NVML shutdown failed: %s", exc)


def probe() -> str | None:
    """``None`` when NVML answers and sees at least one GPU, else the reason it cannot be used."""
    try:
        nv = _load_pynvml()
        _init(nv)
    except SourceUnavailable as exc:
        return str(exc)
    try:
        count = int(nv.nvmlDeviceGetCount())
    except nv.NVMLError as exc:
        return f"NVML could not count GPUs: {exc}"
    finally:
        _shutdown(nv)
    return None if count > 0 else "NVML found no GPUs"


def _text(value: object) -> str:
    # nvidia-ml-py decodes strings on Python 3; older releases returned bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class _Gpu:
    """What the source keeps for one GPU between ticks."""

    index: int
    handle: Any
    info: GpuInfo
    unsupported: set[str] = field(default_factory=set)
    failing: bool = False
    power_integral: Integral | None = None  # set when the GPU has no energy counter
    nvlink_mode: str | None = None  # "aggregate" | "links" | "gpm" | None
    nvlink_links: list[int] = field(default_factory=list)
    gpm_samples: list[Any] = field(default_factory=list)  # [previous, current]
    gpm_request: Any = None
    gpm_last_s: float = 0.0
    gpm_tx_bytes: float = 0.0
    gpm_rx_bytes: float = 0.0
    event_set: Any = None
    xid_errors: int = 0
    last_xid: int | None = None
    energy: MonotonicCounter = field(init=False)  # mJ
    nvlink_tx: MonotonicCounter = field(init=False)  # KiB
    nvlink_rx: MonotonicCounter = field(init=False)
    ecc_corrected: MonotonicCounter = field(init=False)
    ecc_uncorrected: MonotonicCounter = field(init=False)
    nvlink_errors: list[MonotonicCounter] = field(init=False)  # in nvml_h.FI_NVLINK_ERRORS_TOTAL order
    memory_v1: bool = False  # the v2 memory query is not available: v1's used includes reserved

    def __post_init__(self) -> None:
        i = self.index
        self.energy = MonotonicCounter(f"GPU {i} energy counter (mJ)")
        self.nvlink_tx = MonotonicCounter(f"GPU {i} NVLink tx counter (KiB)")
        self.nvlink_rx = MonotonicCounter(f"GPU {i} NVLink rx counter (KiB)")
        self.ecc_corrected = MonotonicCounter(f"GPU {i} corrected ECC errors", keep_first=True)
        self.ecc_uncorrected = MonotonicCounter(f"GPU {i} uncorrected ECC errors", keep_first=True)
        self.nvlink_errors = [
            MonotonicCounter(f"GPU {i} NVLink error field {f}", keep_first=True) for f in nvml_h.FI_NVLINK_ERRORS_TOTAL
        ]

    @property
    def energy_integrated(self) -> bool:
        return self.power_integral is not None


def _scaled(value: float | None, factor: float) -> int | None:
    return None if value is None else int(value * factor)


class NvmlSource:
    """GPU samples from NVML, one per GPU per ``sample()``.

    ``clock`` measures the intervals used where a rate is integrated (energy from power when
    the energy counter is unsupported, NVLink bytes from GPM rates); timestamps are wall time.
    """

    name = "nvml"
    simulated = False

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or WallClock()
        self._nv: Any = None
        self._gpus: list[_Gpu] = []
        self._once = OnceLogger(log)
        self._check = ReadingCheck(log)
        self._throttle_fn = _CLOCK_EVENTS_FN

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        if self._gpus:
            return [gpu.info for gpu in self._gpus]
        nv = _load_pynvml()
        _init(nv)
        try:
            count = int(nv.nvmlDeviceGetCount())
            driver = _text(nv.nvmlSystemGetDriverVersion())
        except nv.NVMLError as exc:
            _shutdown(nv)
            raise SourceUnavailable(
                f"NVML could not list GPUs: {exc}", hint=f"check nvidia-smi, or {SIM_HINT}"
            ) from exc
        self._nv = nv
        for index in range(count):
            try:
                self._gpus.append(self._open_gpu(index))
            except (nv.NVMLError, _GpuNotAnswering) as exc:
                # One broken GPU must not keep the others from being watched.
                log.warning("GPU %d skipped: NVML cannot open it (%s)", index, exc)
        if not self._gpus:
            self._nv = None
            _shutdown(nv)
            raise SourceUnavailable(
                f"NVML found no usable GPUs ({count} listed)", hint=f"check nvidia-smi, or {SIM_HINT}"
            )
        log.info("NVML source: driver %s, %d of %d GPUs", driver, len(self._gpus), count)
        return [gpu.info for gpu in self._gpus]

    def interrupt(self) -> None:
        """Nothing to abort: NVML calls are local, and the driver bounds them."""

    def close(self) -> None:
        if self._nv is None:
            return
        nv = self._nv
        for gpu in self._gpus:
            self._free(gpu)
        self._gpus = []
        self._nv = None
        _shutdown(nv)

    def _free(self, gpu: _Gpu) -> None:
        nv = self._nv
        try:
            if gpu.event_set is not None:
                nv.nvmlEventSetFree(gpu.event_set)
            for gpm_sample in gpu.gpm_samples:
                if gpm_sample is not None:
                    nv.nvmlGpmSampleFree(gpm_sample)
        except nv.NVMLError as exc:
            log.debug("GPU %d: freeing NVML resources failed: %s", gpu.index, exc)
        gpu.event_set = None
        gpu.gpm_samples = []

    def _open_gpu(self, index: int) -> _Gpu:
        handle = self._nv.nvmlDeviceGetHandleByIndex(index)
        gpu = _Gpu(index=index, handle=handle, info=GpuInfo(index=index, uuid="", model=""))
        try:
            self._setup_gpu(gpu)
        except (self._nv.NVMLError, _GpuNotAnswering):
            self._free(gpu)
            raise
        return gpu

    def _setup_gpu(self, gpu: _Gpu) -> None:
        index, handle = gpu.index, gpu.handle
        name = self._call(gpu, "name", "nvmlDeviceGetName", handle)
        uuid = self._call(gpu, "uuid", "nvmlDeviceGetUUID", handle)
        memory = self._read_memory(gpu)
        limit_mw = self._call(gpu, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", handle)
        gpu.info = GpuInfo(
            index=index,
            uuid=_text(uuid) if uuid is not None else f"nvml-{index}",
            model=_text(name) if name is not None else "unknown NVIDIA GPU",
            memory_total_bytes=int(memory.total) if memory is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
        )
        now_s = self._clock.now()
        self._read_energy_counter(gpu, now_s)  # the first reading is the zero of "since open"
        self._open_nvlink(gpu, now_s)
        self._open_events(gpu)

    def _open_nvlink(self, gpu: _Gpu, now_s: float) -> None:
        """Chooses how this GPU's NVLink bytes are read and takes the first reading.

        First choice: the throughput field values with the all-links scope, which the driver
        sums itself (summing per-link scopes risks counting N times on drivers that answer
        every link with the total). Then per-link scopes summed, for drivers that refuse the
        all-links scope. Then GPM rates (Hopper and newer) integrated over time.
        """
        ids = [
            (nvml_h.FI_NVLINK_LINK_COUNT, 0),
            (nvml_h.FI_NVLINK_DATA_TX, nvml_h.SCOPE_ALL_LINKS),
            (nvml_h.FI_NVLINK_DATA_RX, nvml_h.SCOPE_ALL_LINKS),
        ]
        values = self._field_values(gpu, ids, quiet=True)
        if values is not None:
            links, tx_kib, rx_kib = values
            if links == 0:
                self._unsupported(gpu, "nvlink", "the GPU has no NVLink links")
                return
            if tx_kib is not None and rx_kib is not None:
                gpu.nvlink_mode = "aggregate"
                gpu.nvlink_tx.update(tx_kib)
                gpu.nvlink_rx.update(rx_kib)
                return
            all_links = range(links or nvml_h.NVLINK_MAX_LINKS)
            ids = [(nvml_h.FI_NVLINK_DATA_TX, link) for link in all_links] + [
                (nvml_h.FI_NVLINK_DATA_RX, link) for link in all_links
            ]
            per_link = self._field_values(gpu, ids, quiet=True)
            if per_link is not None:
                tx, rx = per_link[: len(all_links)], per_link[len(all_links) :]
                answered = [i for i in range(len(all_links)) if tx[i] is not None and rx[i] is not None]
                if answered:
                    gpu.nvlink_mode = "links"
                    gpu.nvlink_links = [all_links[i] for i in answered]
                    gpu.nvlink_tx.update(sum(tx[i] or 0 for i in answered))
                    gpu.nvlink_rx.update(sum(rx[i] or 0 for i in answered))
                    return
        if self._open_gpm(gpu, now_s):
            return
        self._unsupported(gpu, "nvlink", "neither NVLink throughput fields nor GPM metrics answer")

    def _open_gpm(self, gpu: _Gpu, now_s: float) -> bool:
        nv = self._nv
        support = self._call(gpu, "nvlink", "nvmlGpmQueryDeviceSupport", gpu.handle, quiet=True)
        if support is None or not support.isSupportedDevice:
            return False
        gpu.gpm_samples = [
            self._call(gpu, "nvlink", "nvmlGpmSampleAlloc", quiet=True),
            self._call(gpu, "nvlink", "nvmlGpmSampleAlloc", quiet=True),
        ]
        if None in gpu.gpm_samples:
            return False
        if self._call(gpu, "nvlink", "nvmlGpmSampleGet", gpu.handle, gpu.gpm_samples[0], quiet=True) is None:
            return False
        request = nv.c_nvmlGpmMetricsGet_t()
        request.version = nvml_h.GPM_METRICS_GET_VERSION
        request.numMetrics = 2
        request.metrics[0].metricId = nvml_h.GPM_NVLINK_TOTAL_TX_PER_SEC
        request.metrics[1].metricId = nvml_h.GPM_NVLINK_TOTAL_RX_PER_SEC
        gpu.gpm_request = request
        gpu.gpm_last_s = now_s
        gpu.nvlink_mode = "gpm"
        log.debug("GPU %d: NVLink bytes integrated from GPM rates", gpu.index)
        return True

    def _open_events(self, gpu: _Gpu) -> None:
        """Registers for XID critical-error events on a set of this GPU's own, so events need
        no sorting by device and a lost GPU cannot disturb the others' sets."""
        nv = self._nv
        try:
            event_set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            self._unsupported(gpu, "xid", f"no NVML event set: {exc}")
            return
        try:
            nv.nvmlDeviceRegisterEvents(gpu.handle, nvml_h.EVENT_XID_CRITICAL, event_set)
        except nv.NVMLError as exc:
            nv.nvmlEventSetFree(event_set)
            if exc.value in nvml_h.GPU_FAILED:
                raise _GpuNotAnswering(f"xid: {exc}") from exc
            self._unsupported(gpu, "xid", f"cannot register for XID events: {exc}")
            return
        gpu.event_set = event_set

    # -- sampling ----------------------------------------------------------------------------

    def sample(self) -> list[GpuSample]:
        if self._nv is None:
            raise SourceError("the NVML source is not open")
        return [self._sample_gpu(gpu) for gpu in self._gpus]

    def _sample_gpu(self, gpu: _Gpu) -> GpuSample:
        sample = GpuSample(index=gpu.index, timestamp_s=time.time())
        try:
            self._read(gpu, sample)
        except _GpuNotAnswering as exc:
            if not gpu.failing:
                log.warning("GPU %d stopped answering NVML: %s", gpu.index, exc)
            gpu.failing = True
            failed = GpuSample(
                index=gpu.index,
                timestamp_s=sample.timestamp_s,
                ok=False,
                error=str(exc),
                energy_method="integrated" if gpu.energy_integrated else "counter",
            )
            # XID events are most wanted exactly when a GPU fails; the event queue may still answer.
            with contextlib.suppress(_GpuNotAnswering):
                self._read_xid(gpu, failed)
            return failed
        if gpu.failing:
            log.warning("GPU %d answers NVML again", gpu.index)
            gpu.failing = False
        return sample

    def _read(self, gpu: _Gpu, s: GpuSample) -> None:
        h = gpu.handle
        now_s = self._clock.now()
        power_mw = self._call(gpu, "power", "nvmlDeviceGetPowerUsage", h)
        s.power_w = power_mw / 1000.0 if power_mw is not None else None
        self._read_energy(gpu, s, now_s)
        limit_mw = self._call(gpu, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h)
        s.power_limit_w = limit_mw / 1000.0 if limit_mw is not None else None
        memory = self._read_memory(gpu)
        if memory is not None:
            s.memory_used_bytes = int(memory.used)
            s.memory_total_bytes = int(memory.total)
        util = self._call(gpu, "utilization", "nvmlDeviceGetUtilizationRates", h)
        s.utilization = util.gpu / 100.0 if util is not None else None
        clock_mhz = self._call(gpu, "sm_clock", "nvmlDeviceGetClockInfo", h, nvml_h.CLOCK_SM)
        s.sm_clock_mhz = float(clock_mhz) if clock_mhz is not None else None
        temperature_c = self._call(gpu, "temperature", "nvmlDeviceGetTemperature", h, nvml_h.TEMPERATURE_GPU)
        s.temperature_c = float(temperature_c) if temperature_c is not None else None
        s.throttle_reasons = self._read_throttle(gpu)
        self._read_nvlink(gpu, s, now_s)
        ecc_fn, volatile = "nvmlDeviceGetTotalEccErrors", nvml_h.ECC_VOLATILE
        corrected = self._call(gpu, "ecc", ecc_fn, h, nvml_h.ECC_CORRECTED, volatile)
        if corrected is not None:
            s.ecc_corrected = _scaled(gpu.ecc_corrected.update(corrected), 1)
            uncorrected = self._call(gpu, "ecc", ecc_fn, h, nvml_h.ECC_UNCORRECTED, volatile)
            s.ecc_uncorrected = _scaled(gpu.ecc_uncorrected.update(uncorrected), 1)
        self._read_xid(gpu, s)
        self._check.sweep(s)

    def _read_memory(self, gpu: _Gpu) -> Any:
        """The v2 memory query, whose used excludes the driver's reserved memory (as dcgm-exporter's
        FB_USED does); v1, whose used includes it, where the driver or binding lacks v2."""
        nv = self._nv
        if not gpu.memory_v1 and "memory" not in gpu.unsupported:
            version = getattr(nv, "nvmlMemory_v2", nvml_h.MEMORY_V2)
            try:
                return nv.nvmlDeviceGetMemoryInfo(gpu.handle, version=version)
            except TypeError:
                reason = "this nvidia-ml-py has no version argument"
            except nv.NVMLError as exc:
                if exc.value not in nvml_h.UNSUPPORTED:
                    self._failed(gpu, "memory", exc)
                    return None
                reason = str(exc)
            gpu.memory_v1 = True
            message = "GPU %d: no v2 memory query (%s); used memory includes what the driver reserves"
            log.info(message, gpu.index, reason)
        return self._call(gpu, "memory", "nvmlDeviceGetMemoryInfo", gpu.handle)

    def _read_energy_counter(self, gpu: _Gpu, now_s: float) -> float | None:
        """Joules since open from the hardware counter (mJ since driver load). Where the GPU
        has no counter, switches it to integrating power and returns ``None``."""
        nv = self._nv
        try:
            energy_mj = int(nv.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except nv.NVMLError as exc:
            if exc.value in nvml_h.UNSUPPORTED:
                self._once.warn(
                    (gpu.index, "energy"),
                    "GPU %d: no energy counter (%s); integrating power over time instead",
                    gpu.index,
                    exc,
                )
                self._start_integrating(gpu, now_s)
            else:
                self._failed(gpu, "energy", exc)
            return None
        total_mj = gpu.energy.update(energy_mj)
        return None if total_mj is None else total_mj / 1000.0

    def _read_energy(self, gpu: _Gpu, s: GpuSample, now_s: float) -> None:
        if gpu.power_integral is None:
            s.energy_j = self._read_energy_counter(gpu, now_s)
            if gpu.power_integral is None:
                return  # a value, or a one-tick failure that leaves the counter as it was
        s.energy_method = "integrated"
        s.energy_j = gpu.power_integral.update(s.power_w, now_s)

    def _start_integrating(self, gpu: _Gpu, now_s: float) -> None:
        # Carries on from what the counter counted (no reset); the first power reading after
        # this is the integral's first point.
        gpu.power_integral = Integral(f"GPU {gpu.index} power (W)", start=gpu.energy.total / 1000.0)

    def _read_throttle(self, gpu: _Gpu) -> int | None:
        if "throttle_reasons" in gpu.unsupported:
            return None
        nv = self._nv
        fn = getattr(nv, self._throttle_fn, None)
        try:
            if fn is None:
                raise nv.NVMLError(nvml_h.ERR_FUNCTION_NOT_FOUND)
            return int(fn(gpu.handle))
        except nv.NVMLError as exc:
            if exc.value == nvml_h.ERR_FUNCTION_NOT_FOUND and self._throttle_fn == _CLOCK_EVENTS_FN:
                # The driver (or binding) predates the clocks-event name: use the older one.
                log.info("NVML: %s not available, using %s", _CLOCK_EVENTS_FN, _THROTTLE_FN)
                self._throttle_fn = _THROTTLE_FN
                return self._read_throttle(gpu)
            self._failed(gpu, "throttle_reasons", exc)
            return None

    def _read_nvlink(self, gpu: _Gpu, s: GpuSample, now_s: float) -> None:
        if gpu.nvlink_mode in ("aggregate", "links"):
            if gpu.nvlink_mode == "aggregate":
                all_links = nvml_h.SCOPE_ALL_LINKS
                ids = [(nvml_h.FI_NVLINK_DATA_TX, all_links), (nvml_h.FI_NVLINK_DATA_RX, all_links)]
            else:
                ids = [(nvml_h.FI_NVLINK_DATA_TX, link) for link in gpu.nvlink_links]
                ids += [(nvml_h.FI_NVLINK_DATA_RX, link) for link in gpu.nvlink_links]
            throughput = len(ids)
            errors = self._nvlink_error_ids(gpu)
            # One call for both: the error totals ride along with the throughput counters.
            values = self._field_values(gpu, ids + errors)
            if values is None:
                return
            self._set_nvlink_errors(gpu, s, values[throughput:])
            values = values[:throughput]
            if any(v is None for v in values):
                return
            half = len(values) // 2
            tx_kib = sum(v or 0 for v in values[:half])
            rx_kib = sum(v or 0 for v in values[half:])
            s.nvlink_tx_bytes = _scaled(gpu.nvlink_tx.update(tx_kib), _BYTES_PER_KIB)
            s.nvlink_rx_bytes = _scaled(gpu.nvlink_rx.update(rx_kib), _BYTES_PER_KIB)
        elif gpu.nvlink_mode == "gpm":
            self._read_gpm(gpu, s, now_s)
            errors = self._nvlink_error_ids(gpu)
            if errors:
                # A separate call here, so its refusal leaves the GPM throughput alone.
                self._set_nvlink_errors(gpu, s, self._field_values(gpu, errors, what=_NVLINK_ERRORS) or [])

    def _nvlink_error_ids(self, gpu: _Gpu) -> list[tuple[int, int]]:
        if _NVLINK_ERRORS in gpu.unsupported:
            return []
        return [(f, 0) for f in nvml_h.FI_NVLINK_ERRORS_TOTAL]

    def _set_nvlink_errors(self, gpu: _Gpu, s: GpuSample, values: list[int | None]) -> None:
        """CRC (flit + data), replay and recovery totals from the four field values, if read."""
        if len(values) != len(gpu.nvlink_errors):
            return
        flit, data, replay, recovery = (c.update(v) for c, v in zip(gpu.nvlink_errors, values, strict=True))
        s.nvlink_crc_errors = None if flit is None or data is None else int(flit + data)
        s.nvlink_replay_errors = _scaled(replay, 1)
        s.nvlink_recovery_errors = _scaled(recovery, 1)

    def _read_gpm(self, gpu: _Gpu, s: GpuSample, now_s: float) -> None:
        previous, current = gpu.gpm_samples
        if self._call(gpu, "nvlink", "nvmlGpmSampleGet", gpu.handle, current) is None:
            return
        request = gpu.gpm_request
        request.sample1, request.sample2 = previous, current
        if self._call(gpu, "nvlink", "nvmlGpmMetricsGet", request) is None:
            return
        gpu.gpm_samples = [current, previous]  # this sample is the start of the next interval
        dt_s = max(0.0, now_s - gpu.gpm_last_s)
        gpu.gpm_last_s = now_s
        tx, rx = request.metrics[0], request.metrics[1]
        for metric in (tx, rx):
            if metric.nvmlReturn != 0:
                self._failed(gpu, "nvlink", self._nv.NVMLError(metric.nvmlReturn))
                return
        # GPM gives the mean rate between its two samples, which are this interval's ends, so
        # rate x interval is exact here (no trapezoid between point readings). An impossible
        # rate leaves that direction's traffic for the interval unknown: missing, never subtracted.
        tx_mibs = self._check(gpu.index, "nvlink_tx_rate", float(tx.value))
        if tx_mibs is not None:
            gpu.gpm_tx_bytes += tx_mibs * _BYTES_PER_MIB * dt_s
            s.nvlink_tx_bytes = round(gpu.gpm_tx_bytes)
        rx_mibs = self._check(gpu.index, "nvlink_rx_rate", float(rx.value))
        if rx_mibs is not None:
            gpu.gpm_rx_bytes += rx_mibs * _BYTES_PER_MIB * dt_s
            s.nvlink_rx_bytes = round(gpu.gpm_rx_bytes)

    def _read_xid(self, gpu: _Gpu, s: GpuSample) -> None:
        if gpu.event_set is None:
            return
        nv = self._nv
        for _ in range(_MAX_EVENTS_PER_TICK):
            try:
                event = nv.nvmlEventSetWait(gpu.event_set, 0)  # 0 ms: poll, never block the tick
            except nv.NVMLError as exc:
                if exc.value != nvml_h.ERR_TIMEOUT:  # Timeout means "no event pending"
                    self._failed(gpu, "xid", exc)
                break
            if event.eventType & nvml_h.EVENT_XID_CRITICAL:
                gpu.xid_errors += 1
                gpu.last_xid = int(event.eventData)
                log.warning("GPU %d: XID %d", gpu.index, gpu.last_xid)
        s.xid_errors = gpu.xid_errors
        s.last_xid = gpu.last_xid

    # -- NVML calls and their failures -------------------------------------------------------

    def _call(self, gpu: _Gpu, what: str, fn_name: str, *args: Any, quiet: bool = False) -> Any:
        """One NVML call for one field of one GPU; ``None`` when it gave no value.

        ``quiet`` is for trying out alternatives at open: a refusal is neither logged nor
        remembered, the caller decides what it means. A GPU that stops answering always raises.
        """
        if what in gpu.unsupported:
            return None
        nv = self._nv
        fn: Callable[..., Any] | None = getattr(nv, fn_name, None)
        if fn is None:
            if not quiet:
                self._unsupported(gpu, what, f"{fn_name} is not in this nvidia-ml-py")
            return None
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            self._failed(gpu, what, exc, quiet=quiet)
            return None

    def _field_values(
        self, gpu: _Gpu, ids: list[tuple[int, int]], quiet: bool = False, what: str = "nvlink"
    ) -> list[int | None] | None:
        """``nvmlDeviceGetFieldValues``: one integer or ``None`` per (field, scope), or ``None``
        when the call as a whole failed."""
        values = self._call(gpu, what, "nvmlDeviceGetFieldValues", gpu.handle, ids, quiet=quiet)
        if values is None:
            return None
        out: list[int | None] = []
        for value in values:
            code = int(value.nvmlReturn)
            if code == 0:
                # Field 91 is an unsigned int, the throughput and error counters unsigned long long.
                is_uint = value.fieldId == nvml_h.FI_NVLINK_LINK_COUNT
                out.append(int(value.value.uiVal if is_uint else value.value.ullVal))
                continue
            out.append(None)
            # A refused error total must not stop the throughput counters read in the same call.
            what = _NVLINK_ERRORS if value.fieldId in nvml_h.FI_NVLINK_ERRORS_TOTAL else "nvlink"
            self._failed(gpu, what, self._nv.NVMLError(code), quiet=quiet)
        return out

    def _failed(self, gpu: _Gpu, what: str, exc: Any, quiet: bool = False) -> None:
        code = exc.value
        if code in nvml_h.GPU_FAILED:
            raise _GpuNotAnswering(f"{what}: {exc}")
        if quiet:
            log.debug("GPU %d: %s refused (%s)", gpu.index, what, exc)
            return
        if code in nvml_h.UNSUPPORTED:
            self._unsupported(gpu, what, str(exc))
            return
        self._once.warn(
            (gpu.index, what, code),
            "GPU %d: NVML could not read %s this tick (%s); reported as missing",
            gpu.index,
            what,
            exc,
        )

    def _unsupported(self, gpu: _Gpu, what: str, reason: str) -> None:
        gpu.unsupported.add(what)
        self._once.warn(
            (gpu.index, what), "GPU %d: %s not available (%s); reported as missing", gpu.index, what, reason
        )
