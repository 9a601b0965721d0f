"""The recorded public metrics pages (see pages/SOURCES.md), read as the servers served them."""

from __future__ import annotations

from pathlib import Path

PAGES = Path(__file__).resolve().parent / "pages"

VLLM_V0 = "vllm_v0_bloom560m.txt"
VLLM_V1_EARLY = "vllm_v1_qwen_coder.txt"
VLLM_V1 = "vllm_v1_glm45.txt"
SGLANG_EARLY = "sglang_early_gemma2.txt"
SGLANG_EARLY_TOKENS = "sglang_early_llama32.txt"
SGLANG = "sglang_llama3_8b.txt"
SGLANG_DISAGG = "sglang_deepseek_r1.txt"
TRTLLM_STAT = "trtllm_iteration_stat_trt_backend.json"
TRTLLM_EMPTY = "trtllm_iteration_stats_empty.json"
TRTLLM_UNPREFIXED = "trtllm_prometheus_unprefixed.txt"


def page(name: str) -> bytes:
    """The page as the server sent it: the one recorded iteration statistic goes back into the
    JSON list ``trtllm-serve`` answers with (SOURCES.md)."""
    body = (PAGES / name).read_bytes()
    return b"[" + body + b"]" if name == TRTLLM_STAT else body
