"""Warm-up: which kind a phase has, when it is over, and the automatic ramp-up detection.

Warm-up requests (or seconds) run first and are excluded from every result. For a
requests-bounded ``offline`` run the warm-up batch drains before the measured batch is issued
(one query, as MLPerf); elsewhere, duration-bounded offline included, the measured window
starts while the warm-up requests are still in flight so the load never dips. A
duration-bounded offline run given no warm-up measures from the end of its ramp-up: when the
output rate stops climbing (``ramp_over``). The rate is that of the tokens generated, those of
requests still in flight included: a simulated request reports only its first token and its
end, and a cold start's first requests all end late together, so the tokens reported so far
stay flat while the output is still climbing.

The rule finds the end of a climb, not a steady state: the simulated engine started cold
fills every batch at once and then swings (its requests stay in step), and no warm-up rule
makes a short window of that swing read its mean; ``--warm-start`` starts it steady instead.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rackscope.runner.config import RunConfig
    from rackscope.runner.scenarios import PhaseSpec

# Automatic warm-up: the window opens when the output rate over the last AUTO_WARMUP_SPAN_S
# grew less than AUTO_WARMUP_GROWTH over the span before it (spans of several seconds, so an
# engine that delivers tokens in bursts of whole iterations does not look flat by chance), or
# after AUTO_WARMUP_MAX_S at the latest.
AUTO_WARMUP_GROWTH = 0.02
AUTO_WARMUP_SPAN_S = 3.0
AUTO_WARMUP_MAX_S = 120.0

WarmupMode = Literal["requests", "seconds", "auto", "none"]


def warmup_mode(config: RunConfig, spec: PhaseSpec) -> WarmupMode:
    """How the phase warms up: a request count, seconds, the automatic ramp, or not at all."""
    if config.warmup_requests:
        return "requests"
    if config.warmup_s:
        return "seconds"
    if config.warmup_auto and spec.kind == "offline" and config.duration_s is not None:
        return "auto"
    return "none"


def warmup_deadline(config: RunConfig, mode: WarmupMode, now: float) -> float:
    """When a warm-up by seconds (or the automatic one, at the latest) is over."""
    return now + (config.warmup_s if mode == "seconds" else AUTO_WARMUP_MAX_S if mode == "auto" else 0.0)


def drains_first(config: RunConfig, spec: PhaseSpec, mode: WarmupMode) -> bool:
    """True when the warm-up requests must finish before the measured ones go out."""
    # A requests-bounded offline run's warm-up batch drains before the measured batch goes
    # out (one query, as MLPerf); a duration-bounded one measures a saturated engine, so
    # there, as elsewhere and for the automatic ramp-up, the load carries straight on.
    return spec.kind == "offline" and mode in ("requests", "seconds") and config.duration_s is None


def ramp_over(history: list[tuple[float, int]]) -> bool:
    """True once the output rate of the last span is no more than AUTO_WARMUP_GROWTH above
    the rate of the span before it (and tokens are flowing)."""
    t_end, n_end = history[-1]
    if t_end - history[0][0] < 2 * AUTO_WARMUP_SPAN_S:
        return False

    def tokens_at(t: float) -> float:
        for (t0, n0), (t1, n1) in itertools.pairwise(history):
            if t0 <= t <= t1:
                return n0 + (n1 - n0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return float(history[0][1])

    mid, start = t_end - AUTO_WARMUP_SPAN_S, t_end - 2 * AUTO_WARMUP_SPAN_S
    recent = n_end - tokens_at(mid)
    before = tokens_at(mid) - tokens_at(start)
    return recent > 0 and recent <= before * (1.0 + AUTO_WARMUP_GROWTH)

