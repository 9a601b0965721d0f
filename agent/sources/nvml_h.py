"""Numbers from nvml.h that the NVML source relies on: return codes, how it classifies them, field ids.

Kept apart from the source so that it reads as behaviour; nothing here imports ``pynvml``.
"""

# NVML return codes (nvml.h). Classified by number so the tiers do not depend on which
# NVMLError_* classes a given nvidia-ml-py release generates.
ERR_UNINITIALIZED = 1
ERR_INVALID_ARGUMENT = 2
ERR_NOT_SUPPORTED = 3
ERR_NO_PERMISSION = 4
ERR_NOT_FOUND = 6
ERR_DRIVER_NOT_LOADED = 9
ERR_TIMEOUT = 10
ERR_IRQ_ISSUE = 11
ERR_LIBRARY_NOT_FOUND = 12
ERR_FUNCTION_NOT_FOUND = 13
ERR_GPU_IS_LOST = 15
ERR_RESET_REQUIRED = 16
ERR_OPERATING_SYSTEM = 17
ERR_LIB_RM_VERSION_MISMATCH = 18
ERR_ARGUMENT_VERSION_MISMATCH = 25
ERR_DEPRECATED = 26
ERR_GPU_NOT_FOUND = 28
ERR_UNKNOWN = 999

# This GPU, driver or library cannot give the field at all: report None and stop asking.
UNSUPPORTED = frozenset(
    {
        ERR_INVALID_ARGUMENT,
        ERR_NOT_SUPPORTED,
        ERR_NO_PERMISSION,
        ERR_NOT_FOUND,
        ERR_FUNCTION_NOT_FOUND,
        ERR_ARGUMENT_VERSION_MISMATCH,
        ERR_DEPRECATED,
    }
)
# The GPU (or the driver under it) stopped answering: the whole sample of that GPU fails.
# Any other code makes one field None for one tick.
GPU_FAILED = frozenset(
    {
        ERR_UNINITIALIZED,
        ERR_DRIVER_NOT_LOADED,
        ERR_TIMEOUT,
        ERR_IRQ_ISSUE,
        ERR_GPU_IS_LOST,
        ERR_RESET_REQUIRED,
        ERR_OPERATING_SYSTEM,
        ERR_LIB_RM_VERSION_MISMATCH,
        ERR_GPU_NOT_FOUND,
        ERR_UNKNOWN,
    }
)

# Other nvml.h constants (also in pynvml; kept here so an older binding still works).
FI_NVLINK_LINK_COUNT = 91
FI_NVLINK_DATA_TX = 138  # KiB
FI_NVLINK_DATA_RX = 139  # KiB
# NVLink error totals over all links since driver load (scopeId ignored).
FI_NVLINK_CRC_FLIT_ERRORS_TOTAL = 38
FI_NVLINK_CRC_DATA_ERRORS_TOTAL = 45
FI_NVLINK_REPLAY_ERRORS_TOTAL = 52
FI_NVLINK_RECOVERY_ERRORS_TOTAL = 59
FI_NVLINK_ERRORS_TOTAL = (
    FI_NVLINK_CRC_FLIT_ERRORS_TOTAL,
    FI_NVLINK_CRC_DATA_ERRORS_TOTAL,
    FI_NVLINK_REPLAY_ERRORS_TOTAL,
    FI_NVLINK_RECOVERY_ERRORS_TOTAL,
)
SCOPE_ALL_LINKS = 0xFFFFFFFF  # scopeId UINT_MAX: the driver sums the counter over all links
NVLINK_MAX_LINKS = 36
GPM_NVLINK_TOTAL_RX_PER_SEC = 60  # MiB/s
GPM_NVLINK_TOTAL_TX_PER_SEC = 61  # MiB/s
GPM_METRICS_GET_VERSION = 1
EVENT_XID_CRITICAL = 0x8
CLOCK_SM = 1
TEMPERATURE_GPU = 0
ECC_CORRECTED = 0
ECC_UNCORRECTED = 1
MEMORY_V2 = 0x02000028  # nvmlMemory_v2: sizeof(nvmlMemory_v2_t) | 2 << 24
ECC_VOLATILE = 0  # since driver load, as opposed to aggregate over the board's life
