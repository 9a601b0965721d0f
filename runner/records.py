"""Per-request timing records: what one request did, as the run's JSONL rows hold it."""

from __future__ import annotations

from dataclasses import dataclass

# error_type of a request the runner stopped (deadline, cancel or stop): neither completed nor failed.
CANCELLED = "cancelled"


@dataclass(slots=True)
class RequestRecord:
    """Timings are monotonic seconds on the engine's clock; durations derive from them."""

    request_id: str
    start_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    output_tokens_method: str = "engine"  # "usage", "counted" or "engine"
    ok: bool = False
    error_type: str | None = None
    error: str | None = None
    # Gaps between token arrivals after the first, in seconds; None when the engine reports
    # only first and last token (the simulated engine), in which case TPOT stands in for ITL.
    itl_s: list[float] | None = None
    gpu: int | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (MLPerf's TPOT)."""
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)
