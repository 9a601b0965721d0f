"""Llama2-70B on one simulated GPU: model and runtime constants, memory footprint, calibrated step cost."""

from __future__ import annotations

from dataclasses import dataclass

from rackscope.errors import EngineUnavailable
from rackscope.simgpu import GIB, GpuProfile

# --- Llama2-70B ------------------------------------------------------------------------------
LLAMA2_70B_PARAMS = 68_976_648_192  # Hugging Face checkpoint parameter count
LLAMA2_70B_EMBEDDING_PARAMS = 2 * 32_000 * 8_192  # embedding + lm_head, kept at 16 bit
LLAMA2_70B_LAYERS = 80
LLAMA2_70B_KV_HEADS = 8  # grouped-query attention
LLAMA2_70B_HEAD_DIM = 128
LLAMA2_70B_HIDDEN = 8_192
LLAMA2_MAX_SEQ_LEN = 4_096  # prompt + output tokens
KV_BYTES_PER_ELEMENT = 1  # FP8 KV cache, as the MLPerf submissions on both families use
# K and V, per layer, per KV head, per head dimension: 163,840 bytes (160 KiB) per token.
KV_BYTES_PER_TOKEN = 2 * LLAMA2_70B_LAYERS * LLAMA2_70B_KV_HEADS * LLAMA2_70B_HEAD_DIM * KV_BYTES_PER_ELEMENT

# Bytes per parameter of the quantised layers. NVFP4 stores 4-bit values plus one FP8 scale
# per block of 16, i.e. 4.5 bits.
BYTES_PER_PARAM = {"fp8": 1.0, "nvfp4": 4.5 / 8}
# Precision and HBM bandwidth (bytes/s, datasheets) per GPU family. FP8 weights: 69.5 GB;
# NVFP4: 39.6 GB (the 16-bit embedding and lm_head add 1.05 GB to either).
WEIGHT_PRECISION = {"h100": "fp8", "h200": "fp8", "b200": "nvfp4", "gb200": "nvfp4", "gb300": "nvfp4"}
HBM_BYTES_PER_S = {"h100": 3.35e12, "h200": 4.8e12, "b200": 8.0e12, "gb200": 8.0e12, "gb300": 8.0e12}

# MLPerf Inference Llama2-70B (OpenOrca, 24,576 samples): mean output about 294 tokens; inputs
# are capped at 1,024 tokens, and we take their mean as 684 (an estimate: prefill is under half
# of an iteration's cost, so an error here moves the time split, not the calibrated
# throughput). The calibration is exact for whatever shape ``deployment_for`` is given.
MLPERF_MEAN_INPUT_TOKENS = 684
MLPERF_MEAN_OUTPUT_TOKENS = 294

# --- serving runtime (TensorRT-LLM-like defaults) --------------------------------------------
MAX_BATCH_LIMIT = 2_048  # TensorRT-LLM's default max_batch_size
# The batch a deployment is tuned for (its max_batch): 80 % of what the KV cache holds at the
# calibration shape. Requests of varied length crowd the batch with long ones (a request stays
# in proportion to its output), which raises the mean KV reservation in flight by ~10 % over
# the dataset mean; the headroom keeps the batch, not the KV cache, the binding limit, so
# varied and fixed lengths of the same means give the same throughput.
KV_BATCH_HEADROOM = 0.8
DEFAULT_MAX_NUM_TOKENS = 8_192  # prompt tokens prefilled per iteration (max_num_tokens)
KV_CACHE_FRACTION = 0.9  # free_gpu_memory_fraction
RUNTIME_RESERVE_BYTES = 3 * GIB  # CUDA context, activations and workspaces, outside the KV pool
# A prompt token costs about half a decode token: prefill is one dense GEMM per layer, with
# no per-token KV-cache read.
PREFILL_TOKEN_COST = 0.5
# Fraction of the step the weight stream may take at the calibration batch; beyond it the
# overhead is clipped so the per-token cost stays positive.
MAX_OVERHEAD_SHARE = 0.9
# Even a batch of one keeps the SMs busy streaming weights; utilisation (which drives power)
# rises from here to 1 at the calibration batch.
UTILIZATION_FLOOR = 0.35
# Tensor-parallel all-reduce traffic per token processed: two all-reduces per layer of the
# hidden state in 16 bit, ring over a 4-GPU group (each GPU sends 2 * (4 - 1) / 4 of it):
# 80 * 2 * 8,192 * 2 B * 1.5 = 3.9 MB per token, the same received.
TP_GROUP = 4
NVLINK_BYTES_PER_TOKEN = LLAMA2_70B_LAYERS * 2 * LLAMA2_70B_HIDDEN * 2 * 2 * (TP_GROUP - 1) / TP_GROUP


@dataclass(frozen=True, slots=True)
class Deployment:
    """Llama2-70B on one GPU: memory footprint and the cost of one iteration at speed 1."""

    gpu_key: str
    precision: str
    weights_bytes: int
    kv_capacity_tokens: int
    step_overhead_s: float
    decode_token_s: float
    prefill_token_s: float
    max_batch: int  # also the calibration batch
    target_tokens_per_s: float

    def step_s(self, decode_batch: int, prefill_tokens: int) -> float:
        return self.step_overhead_s + self.decode_token_s * decode_batch + self.prefill_token_s * prefill_tokens

    def utilization(self, decode_batch: int, prefill_tokens: int) -> float:
        work = (decode_batch + PREFILL_TOKEN_COST * prefill_tokens) / self.max_batch
        return UTILIZATION_FLOOR + (1.0 - UTILIZATION_FLOOR) * min(1.0, work)


def deployment_for(
    profile: GpuProfile,
    input_tokens: int = MLPERF_MEAN_INPUT_TOKENS,
    output_tokens: int = MLPERF_MEAN_OUTPUT_TOKENS,
) -> Deployment:
    """Size the KV cache from HBM and calibrate step costs against the published throughput.

    At saturation ``B = max_batch`` requests are in flight (``KV_BATCH_HEADROOM`` of what the
    KV cache holds at this shape). Every iteration then yields ``B`` output tokens; on average
    ``B / output`` of them come from prefills of ``input`` tokens and the rest from decodes.
    Solving ``B / mean_step_s = published tokens/s`` for the per-token cost gives an exact
    calibration for that shape.
    """
    key = profile.key
    if key not in WEIGHT_PRECISION:
        raise EngineUnavailable(f"no Llama2-70B deployment known for GPU {profile.name!r}")
    precision = WEIGHT_PRECISION[key]
    quantised = LLAMA2_70B_PARAMS - LLAMA2_70B_EMBEDDING_PARAMS
    weights = int(quantised * BYTES_PER_PARAM[precision] + LLAMA2_70B_EMBEDDING_PARAMS * 2)
    free = profile.hbm_bytes - weights - RUNTIME_RESERVE_BYTES
    kv_tokens = int(free * KV_CACHE_FRACTION) // KV_BYTES_PER_TOKEN
    if kv_tokens < LLAMA2_MAX_SEQ_LEN:
        raise EngineUnavailable(f"Llama2-70B ({precision}) leaves no room for a KV cache on {profile.name}")
    batch = max(1, min(MAX_BATCH_LIMIT, int(KV_BATCH_HEADROOM * kv_tokens / (input_tokens + output_tokens))))
    target = profile.llama2_70b_tokens_per_s
    step_s = batch / target
    overhead = min(weights / HBM_BYTES_PER_S[key], MAX_OVERHEAD_SHARE * step_s)
    decode_share = (output_tokens - 1) / output_tokens
    prefill_share = PREFILL_TOKEN_COST * input_tokens / output_tokens
    decode_token_s = (step_s - overhead) / (batch * (decode_share + prefill_share))
    return Deployment(
        gpu_key=key,
        precision=precision,
        weights_bytes=weights,
        kv_capacity_tokens=kv_tokens,
        step_overhead_s=overhead,
        decode_token_s=decode_token_s,
        prefill_token_s=PREFILL_TOKEN_COST * decode_token_s,
        max_batch=batch,
        target_tokens_per_s=target,
    )
