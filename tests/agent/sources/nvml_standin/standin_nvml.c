/*
 * A stand-in for libnvidia-ml.so.1: just the NVML symbols the rackscope NVML source calls,
 * with the C ABI of nvml.h, so the real pynvml bindings can be tested on a machine with no GPU.
 *
 * Behaviour comes from a key=value file named by NVML_STANDIN_CONFIG (read at nvmlInit):
 *
 *   gpus=2                     number of GPUs
 *   init_error=9               nvmlInit returns this code (9 = NVML_ERROR_DRIVER_NOT_LOADED)
 *   gpuN.name=... gpuN.uuid=...
 *   gpuN.power_mw=  gpuN.power_step_mw=      power = base + step * (earlier power reads)
 *   gpuN.energy_mj= gpuN.energy_step_mj=     energy counter, same rule per energy read
 *   gpuN.power_limit_mw= gpuN.mem_total= gpuN.mem_used= gpuN.util_gpu= gpuN.util_mem=
 *   gpuN.sm_clock_mhz= gpuN.temp_c= gpuN.clock_reasons= gpuN.ecc_corrected= gpuN.ecc_uncorrected=
 *   gpuN.nvlink_tx_kib= gpuN.nvlink_rx_kib= gpuN.nvlink_step_kib=   per field-values call
 *   gpuN.nvlink_links=4        active links (field 91); each reports 1/links of the total
 *   gpuN.nvlink_scope=aggregate|links   whether scopeId UINT_MAX (all links) is accepted
 *   gpuN.nvlink_crc_flit= gpuN.nvlink_crc_data= gpuN.nvlink_replay= gpuN.nvlink_recovery=
 *                              NVLink error totals (fields 38/45/52/59); flit CRC and replay
 *   gpuN.nvlink_error_step=    grow by this per field-values call
 *   gpuN.mem_reserved=         memory the driver reserves: in v1's used, apart in v2
 *   gpuN.gpm=1 gpuN.gpm_tx_mibs= gpuN.gpm_rx_mibs=   GPM NVLink rates in MiB/s
 *   gpuN.unsupported=energy,ecc,...   functions that return NVML_ERROR_NOT_SUPPORTED
 *   gpuN.lost_from_tick=3 gpuN.lost_until_tick=5   every call fails with GPU_IS_LOST while
 *                              the tick is in [from, until) (until 0: never recovers)
 *   gpuN.lost=1                every call fails with GPU_IS_LOST from the start
 *   gpuN.xid=2:79,4:48         XID 79 becomes pending at tick 2, XID 48 at tick 4
 *
 * A "tick" is the number of nvmlDeviceGetPowerUsage calls made on that GPU so far, counting
 * the current one: a source reads power once per sample. Counts of every call per GPU are
 * written at nvmlShutdown to the file named by NVML_STANDIN_CALLS ("gpu0.power 5").
 *
 * Built with -DSTANDIN_OLD_DRIVER it lacks the symbols newer drivers added
 * (nvmlDeviceGetCurrentClocksEventReasons, the GPM functions, nvmlDeviceGetMemoryInfo_v2).
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15

#define MAX_GPUS 16
#define MAX_XIDS 16
#define NAME_LEN 96

#define FI_NVLINK_LINK_COUNT 91
#define FI_NVLINK_DATA_TX 138
#define FI_NVLINK_DATA_RX 139
#define FI_NVLINK_CRC_FLIT_TOTAL 38
#define FI_NVLINK_CRC_DATA_TOTAL 45
#define FI_NVLINK_REPLAY_TOTAL 52
#define FI_NVLINK_RECOVERY_TOTAL 59
#define NVML_MEMORY_V2 0x02000028U
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define GPM_NVLINK_TOTAL_RX 60
#define GPM_NVLINK_TOTAL_TX 61
#define EVENT_XID_CRITICAL 0x8ULL
#define VALUE_TYPE_UINT 1
#define VALUE_TYPE_ULL 3

/* Every function the stand-in counts; the names are what the call-count file shows. */
enum func {
    F_NAME, F_UUID, F_POWER, F_ENERGY, F_POWER_LIMIT, F_MEMORY, F_UTILIZATION, F_CLOCK,
    F_TEMPERATURE, F_CLOCK_EVENTS, F_THROTTLE, F_FIELD_VALUES, F_ECC, F_REGISTER_EVENTS,
    F_EVENT_WAIT, F_GPM_SUPPORT, F_GPM_SAMPLE, F_GPM_METRICS, F_COUNT
};
static const char *func_names[F_COUNT] = {
    "name", "uuid", "power", "energy", "power_limit", "memory", "utilization", "clock",
    "temperature", "clock_events", "throttle", "field_values", "ecc", "register_events",
    "event_wait", "gpm_support", "gpm_sample", "gpm_metrics",
};

typedef struct nvmlDevice_st {
    char name[NAME_LEN];
    char uuid[NAME_LEN];
    unsigned long long power_mw, power_step_mw, energy_mj, energy_step_mj, power_limit_mw;
    unsigned long long mem_total, mem_used, util_gpu, util_mem, sm_clock_mhz, temp_c;
    unsigned long long clock_reasons, ecc_corrected, ecc_uncorrected;
    unsigned long long nvlink_tx_kib, nvlink_rx_kib, nvlink_step_kib, nvlink_links;
    unsigned long long nvlink_crc_flit, nvlink_crc_data, nvlink_replay, nvlink_recovery, nvlink_error_step;
    unsigned long long mem_reserved;
    int nvlink_aggregate;
    int gpm;
    double gpm_tx_mibs, gpm_rx_mibs;
    int unsupported[F_COUNT];
    unsigned long long lost_from_tick, lost_until_tick;
    int lost_always;
    unsigned long long xid_tick[MAX_XIDS], xid_code[MAX_XIDS];
    int n_xids, next_xid;
    unsigned long long ticks;
    unsigned long long calls[F_COUNT];
} *nvmlDevice_t;

static struct nvmlDevice_st gpus[MAX_GPUS];
static unsigned int n_gpus;
static int init_error;
static int initialised; /* nvmlInit count not yet shut down */

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef union {
    double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
    long long sllVal; int siVal; unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef struct nvmlEventSet_st { nvmlDevice_t device; unsigned long long types; } *nvmlEventSet_t;

static int func_from_name(const char *name) {
    for (int i = 0; i < F_COUNT; i++)
        if (strcmp(func_names[i], name) == 0) return i;
    fprintf(stderr, "standin: unknown function name %s\n", name);
    return -1;
}

static void set_gpu_key(struct nvmlDevice_st *g, const char *key, const char *val) {
    unsigned long long n = strtoull(val, NULL, 0);
    if (!strcmp(key, "name")) snprintf(g->name, NAME_LEN, "%s", val);
    else if (!strcmp(key, "uuid")) snprintf(g->uuid, NAME_LEN, "%s", val);
    else if (!strcmp(key, "power_mw")) g->power_mw = n;
    else if (!strcmp(key, "power_step_mw")) g->power_step_mw = n;
    else if (!strcmp(key, "energy_mj")) g->energy_mj = n;
    else if (!strcmp(key, "energy_step_mj")) g->energy_step_mj = n;
    else if (!strcmp(key, "power_limit_mw")) g->power_limit_mw = n;
    else if (!strcmp(key, "mem_total")) g->mem_total = n;
    else if (!strcmp(key, "mem_used")) g->mem_used = n;
    else if (!strcmp(key, "util_gpu")) g->util_gpu = n;
    else if (!strcmp(key, "util_mem")) g->util_mem = n;
    else if (!strcmp(key, "sm_clock_mhz")) g->sm_clock_mhz = n;
    else if (!strcmp(key, "temp_c")) g->temp_c = n;
    else if (!strcmp(key, "clock_reasons")) g->clock_reasons = n;
    else if (!strcmp(key, "ecc_corrected")) g->ecc_corrected = n;
    else if (!strcmp(key, "ecc_uncorrected")) g->ecc_uncorrected = n;
    else if (!strcmp(key, "nvlink_tx_kib")) g->nvlink_tx_kib = n;
    else if (!strcmp(key, "nvlink_rx_kib")) g->nvlink_rx_kib = n;
    else if (!strcmp(key, "nvlink_step_kib")) g->nvlink_step_kib = n;
    else if (!strcmp(key, "nvlink_links")) g->nvlink_links = n;
    else if (!strcmp(key, "nvlink_crc_flit")) g->nvlink_crc_flit = n;
    else if (!strcmp(key, "nvlink_crc_data")) g->nvlink_crc_data = n;
    else if (!strcmp(key, "nvlink_replay")) g->nvlink_replay = n;
    else if (!strcmp(key, "nvlink_recovery")) g->nvlink_recovery = n;
    else if (!strcmp(key, "nvlink_error_step")) g->nvlink_error_step = n;
    else if (!strcmp(key, "mem_reserved")) g->mem_reserved = n;
    else if (!strcmp(key, "nvlink_scope")) g->nvlink_aggregate = strcmp(val, "links") != 0;
    else if (!strcmp(key, "gpm")) g->gpm = (int)n;
    else if (!strcmp(key, "gpm_tx_mibs")) g->gpm_tx_mibs = strtod(val, NULL);
    else if (!strcmp(key, "gpm_rx_mibs")) g->gpm_rx_mibs = strtod(val, NULL);
    else if (!strcmp(key, "lost_from_tick")) g->lost_from_tick = n;
    else if (!strcmp(key, "lost_until_tick")) g->lost_until_tick = n;
    else if (!strcmp(key, "lost")) g->lost_always = (int)n;
    else if (!strcmp(key, "unsupported")) {
        char buf[512];
        snprintf(buf, sizeof buf, "%s", val);
        for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
            int f = func_from_name(tok);
            if (f >= 0) g->unsupported[f] = 1;
        }
    } else if (!strcmp(key, "xid")) {
        char buf[512];
        snprintf(buf, sizeof buf, "%s", val);
        for (char *tok = strtok(buf, ","); tok && g->n_xids < MAX_XIDS; tok = strtok(NULL, ",")) {
            char *colon = strchr(tok, ':');
            if (!colon) continue;
            g->xid_tick[g->n_xids] = strtoull(tok, NULL, 0);
            g->xid_code[g->n_xids] = strtoull(colon + 1, NULL, 0);
            g->n_xids++;
        }
    } else fprintf(stderr, "standin: unknown key %s\n", key);
}

static void set_defaults(void) {
    memset(gpus, 0, sizeof gpus);
    n_gpus = 1;
    init_error = NVML_SUCCESS;
    for (unsigned int i = 0; i < MAX_GPUS; i++) {
        struct nvmlDevice_st *g = &gpus[i];
        snprintf(g->name, NAME_LEN, "NVIDIA H100 80GB HBM3");
        snprintf(g->uuid, NAME_LEN, "GPU-00000000-0000-0000-0000-%012u", i);
        g->power_mw = 100000;
        g->energy_mj = 1000000;
        g->power_limit_mw = 700000;
        g->mem_total = 85899345920ULL;
        g->nvlink_links = 18;
        g->nvlink_aggregate = 1;
    }
}

static void load_config(void) {
    set_defaults();
    const char *path = getenv("NVML_STANDIN_CONFIG");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "standin: cannot open %s\n", path); return; }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == '#' || line[0] == 0) continue;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        const char *key = line, *val = eq + 1;
        if (!strcmp(key, "gpus")) n_gpus = (unsigned int)strtoul(val, NULL, 0);
        else if (!strcmp(key, "init_error")) init_error = (int)strtol(val, NULL, 0);
        else if (!strncmp(key, "gpu", 3)) {
            char *dot;
            unsigned long idx = strtoul(key + 3, &dot, 10);
            if (*dot == '.' && idx < MAX_GPUS) set_gpu_key(&gpus[idx], dot + 1, val);
        } else fprintf(stderr, "standin: unknown key %s\n", key);
    }
    fclose(f);
    if (n_gpus > MAX_GPUS) n_gpus = MAX_GPUS;
}

static void write_calls(void) {
    const char *path = getenv("NVML_STANDIN_CALLS");
    if (!path) return;
    FILE *f = fopen(path, "w");
    if (!f) return;
    for (unsigned int i = 0; i < n_gpus; i++)
        for (int c = 0; c < F_COUNT; c++)
            if (gpus[i].calls[c]) fprintf(f, "gpu%u.%s %llu\n", i, func_names[c], gpus[i].calls[c]);
    fclose(f);
}

static int valid(nvmlDevice_t d) {
    return initialised && d >= &gpus[0] && d < &gpus[n_gpus];
}

static int lost(nvmlDevice_t d) {
    return d->lost_always || (d->ticks >= d->lost_from_tick && d->lost_from_tick > 0 &&
           (d->lost_until_tick == 0 || d->ticks < d->lost_until_tick));
}

/* Common entry of every per-device query: counts the call and decides its fate. */
static nvmlReturn_t enter(nvmlDevice_t d, enum func f, void *out) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!valid(d) || (out == NULL)) return NVML_ERROR_INVALID_ARGUMENT;
    d->calls[f]++;
    if (f == F_POWER) d->ticks++;
    if (lost(d)) return NVML_ERROR_GPU_IS_LOST;
    if (d->unsupported[f]) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    if (initialised) { /* NVML counts nested inits; so does the stand-in */
        initialised++;
        return NVML_SUCCESS;
    }
    load_config();
    if (init_error) return init_error;
    initialised = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (--initialised == 0) write_calls();
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Stand-in error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (length < 16) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(version, length, "%s", "999.99.99-standin");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = n_gpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (index >= n_gpus) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    nvmlReturn_t r = enter(d, F_NAME, name);
    if (r) return r;
    snprintf(name, length, "%s", d->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    nvmlReturn_t r = enter(d, F_UUID, uuid);
    if (r) return r;
    snprintf(uuid, length, "%s", d->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *power_mw) {
    nvmlReturn_t r = enter(d, F_POWER, power_mw);
    if (r) return r;
    *power_mw = (unsigned int)(d->power_mw + d->power_step_mw * (d->calls[F_POWER] - 1));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *energy_mj) {
    nvmlReturn_t r = enter(d, F_ENERGY, energy_mj);
    if (r) return r;
    *energy_mj = d->energy_mj + d->energy_step_mj * (d->calls[F_ENERGY] - 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *limit_mw) {
    nvmlReturn_t r = enter(d, F_POWER_LIMIT, limit_mw);
    if (r) return r;
    *limit_mw = (unsigned int)d->power_limit_mw;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *memory) {
    nvmlReturn_t r = enter(d, F_MEMORY, memory);
    if (r) return r;
    memory->total = d->mem_total;
    memory->used = d->mem_used;
    memory->free = d->mem_total - d->mem_used;
    return NVML_SUCCESS;
}

#ifndef STANDIN_OLD_DRIVER
/* v2 counts the driver's reserved memory apart: used excludes it (v1's used includes it). */
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *memory) {
    nvmlReturn_t r = enter(d, F_MEMORY, memory);
    if (r) return r;
    if (memory->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = d->mem_total;
    memory->reserved = d->mem_reserved;
    memory->used = d->mem_used - d->mem_reserved;
    memory->free = d->mem_total - d->mem_used;
    return NVML_SUCCESS;
}
#endif

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *util) {
    nvmlReturn_t r = enter(d, F_UTILIZATION, util);
    if (r) return r;
    util->gpu = (unsigned int)d->util_gpu;
    util->memory = (unsigned int)d->util_mem;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *clock_mhz) {
    nvmlReturn_t r = enter(d, F_CLOCK, clock_mhz);
    if (r) return r;
    if (type != 1) return NVML_ERROR_INVALID_ARGUMENT; /* only NVML_CLOCK_SM is modelled */
    *clock_mhz = (unsigned int)d->sm_clock_mhz;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp_c) {
    nvmlReturn_t r = enter(d, F_TEMPERATURE, temp_c);
    if (r) return r;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp_c = (unsigned int)d->temp_c;
    return NVML_SUCCESS;
}

#ifndef STANDIN_OLD_DRIVER
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *reasons) {
    nvmlReturn_t r = enter(d, F_CLOCK_EVENTS, reasons);
    if (r) return r;
    *reasons = d->clock_reasons;
    return NVML_SUCCESS;
}
#endif

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *reasons) {
    nvmlReturn_t r = enter(d, F_THROTTLE, reasons);
    if (r) return r;
    *reasons = d->clock_reasons;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int error_type, int counter_type,
                                         unsigned long long *count) {
    nvmlReturn_t r = enter(d, F_ECC, count);
    if (r) return r;
    if (counter_type != 0 && counter_type != 1) return NVML_ERROR_INVALID_ARGUMENT;
    *count = error_type == 0 ? d->ecc_corrected : d->ecc_uncorrected;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values) {
    nvmlReturn_t r = enter(d, F_FIELD_VALUES, values);
    if (r) return r;
    unsigned long long k = d->calls[F_FIELD_VALUES] - 1;
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        unsigned long long total;
        v->valueType = VALUE_TYPE_ULL;
        v->timestamp = 0;
        v->latencyUsec = 0;
        if (v->fieldId == FI_NVLINK_LINK_COUNT) {
            v->valueType = VALUE_TYPE_UINT;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.uiVal = (unsigned int)d->nvlink_links;
            continue;
        }
        unsigned long long errors = d->nvlink_error_step * k;
        if (v->fieldId == FI_NVLINK_CRC_FLIT_TOTAL || v->fieldId == FI_NVLINK_CRC_DATA_TOTAL ||
            v->fieldId == FI_NVLINK_REPLAY_TOTAL || v->fieldId == FI_NVLINK_RECOVERY_TOTAL) {
            /* Totals over all links since driver load; scopeId is ignored. */
            v->nvmlReturn = d->nvlink_links ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
            if (v->fieldId == FI_NVLINK_CRC_FLIT_TOTAL) v->value.ullVal = d->nvlink_crc_flit + errors;
            else if (v->fieldId == FI_NVLINK_CRC_DATA_TOTAL) v->value.ullVal = d->nvlink_crc_data;
            else if (v->fieldId == FI_NVLINK_REPLAY_TOTAL) v->value.ullVal = d->nvlink_replay + errors;
            else v->value.ullVal = d->nvlink_recovery;
            continue;
        }
        if (v->fieldId == FI_NVLINK_DATA_TX) total = d->nvlink_tx_kib + d->nvlink_step_kib * k;
        else if (v->fieldId == FI_NVLINK_DATA_RX) total = d->nvlink_rx_kib + d->nvlink_step_kib * k;
        else { v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; continue; }
        if (d->nvlink_links == 0) v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        else if (v->scopeId == UINT_MAX) {
            v->nvmlReturn = d->nvlink_aggregate ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
            v->value.ullVal = total;
        } else if (v->scopeId < d->nvlink_links) {
            v->nvmlReturn = NVML_SUCCESS;
            v->value.ullVal = total / d->nvlink_links;
        } else v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof(struct nvmlEventSet_st));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    nvmlReturn_t r = enter(d, F_REGISTER_EVENTS, set);
    if (r) return r;
    if (set->device && set->device != d) return NVML_ERROR_INVALID_ARGUMENT; /* one GPU per set here */
    set->device = d;
    set->types |= types;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    (void)timeout_ms; /* never blocks: the source only polls with 0 ms */
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!set || !set->device) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlDevice_t d = set->device;
    nvmlReturn_t r = enter(d, F_EVENT_WAIT, data);
    if (r) return r;
    if (!(set->types & EVENT_XID_CRITICAL) || d->next_xid >= d->n_xids ||
        d->xid_tick[d->next_xid] > d->ticks)
        return NVML_ERROR_TIMEOUT;
    memset(data, 0, sizeof *data);
    data->device = d;
    data->eventType = EVENT_XID_CRITICAL;
    data->eventData = d->xid_code[d->next_xid++];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    free(set);
    return NVML_SUCCESS;
}

#ifndef STANDIN_OLD_DRIVER
typedef struct nvmlGpmSample_st { nvmlDevice_t device; unsigned long long seq; } *nvmlGpmSample_t;
typedef struct { unsigned int version, isSupportedDevice; } nvmlGpmSupport_t;
typedef struct { char *shortName, *longName, *unit; } nvmlGpmMetricInfo_t;
typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;
typedef struct {
    unsigned int version, numMetrics;
    nvmlGpmSample_t sample1, sample2;
    nvmlGpmMetric_t metrics[]; /* the caller sizes it; only numMetrics entries are touched */
} nvmlGpmMetricsGet_t;

nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t d, nvmlGpmSupport_t *support) {
    nvmlReturn_t r = enter(d, F_GPM_SUPPORT, support);
    if (r) return r;
    if (support->version != 1) return NVML_ERROR_INVALID_ARGUMENT;
    support->isSupportedDevice = (unsigned int)d->gpm;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof(struct nvmlGpmSample_st));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    free(sample);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t d, nvmlGpmSample_t sample) {
    nvmlReturn_t r = enter(d, F_GPM_SAMPLE, sample);
    if (r) return r;
    if (!d->gpm) return NVML_ERROR_NOT_SUPPORTED;
    sample->device = d;
    sample->seq = d->calls[F_GPM_SAMPLE];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *mg) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!mg || mg->version != 1 || !mg->sample1 || !mg->sample2 || !mg->sample1->device ||
        mg->sample1->device != mg->sample2->device || mg->sample1->seq == mg->sample2->seq)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlDevice_t d = mg->sample1->device;
    nvmlReturn_t r = enter(d, F_GPM_METRICS, mg);
    if (r) return r;
    for (unsigned int i = 0; i < mg->numMetrics; i++) {
        nvmlGpmMetric_t *m = &mg->metrics[i];
        memset(&m->metricInfo, 0, sizeof m->metricInfo);
        m->nvmlReturn = NVML_SUCCESS;
        if (m->metricId == GPM_NVLINK_TOTAL_TX) m->value = d->gpm_tx_mibs;
        else if (m->metricId == GPM_NVLINK_TOTAL_RX) m->value = d->gpm_rx_mibs;
        else { m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; m->value = 0; }
    }
    return NVML_SUCCESS;
}
#endif
