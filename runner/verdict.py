"""Noise-aware verdicts: seeded block-bootstrap intervals of a metric's relative change, and the verdict rule.

What a side (the base runs, or the new runs) holds: one or more runs; each run holds streams
(one for a run record, one per node for a rack record) of time-ordered observations, either
1 s throughput buckets (output tokens, seconds, joules) or finished requests (a latency).

The method:

- A stream is cut into non-overlapping blocks of ``block_length(n)`` consecutive observations,
  about n^(1/3) of them, so that the correlation of neighbouring seconds (a batch wave) or
  neighbouring requests (admitted together) stays inside a block instead of being mistaken for
  independent evidence. A stream has at most ``MAX_BLOCKS`` blocks, and the streams of a side
  share ``SIDE_BLOCKS`` (a rack's nodes get longer blocks): more blocks buy no precision, only time.
- A bootstrap replicate of a side draws its runs with replacement when it has several (runs are
  the top-level blocks, so run-to-run spread counts), then for every stream of every drawn run
  as many blocks with replacement as the stream has, and computes the side's statistic on what
  it drew. Replicates come from ``random.Random`` seeded by the caller: the same records and
  seed give the same interval on every machine.
- The change's replicates are ``new_i / base_i - 1``. Its interval is the percentile interval
  of those replicates around the observed change, widened for small samples by
  ``t(1 - a/2, u - 1) * sqrt(u / (u - 1)) / z(1 - a/2)`` where ``u`` is the number of blocks of
  the smaller side: a percentile bootstrap over few blocks is too narrow (the reasoning of
  Hesterberg's expanded percentile interval), and with many blocks the factor is 1.
- ``decide`` turns an interval into a verdict: ``regression`` when the whole interval lies beyond
  the threshold in the bad direction, ``improvement`` when it lies beyond it in the good
  direction, ``no change`` when it lies within plus or minus the threshold, ``inconclusive``
  otherwise (the data cannot tell a change of the threshold's size from noise).

Pure Python (no numpy): a replicate of a latency percentile touches only the blocks' counts
below a window around the percentile and the few values inside it, so comparing records of
hundreds of thousands of requests stays fast.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from rackscope.runner.results.stats import percentile

Verdict = Literal["regression", "improvement", "no change", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("regression", "improvement", "no change", "inconclusive")
Direction = Literal["higher", "lower"]

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE_PCT = 95.0
DEFAULT_SEED = 0
MAX_BLOCKS = 100  # per stream: more buys no precision, only time
SIDE_BLOCKS = 400  # per side: a rack's many streams share this (each keeps MIN_STREAM_BLOCKS)
MIN_STREAM_BLOCKS = 10
MIN_BLOCKS = 2  # per side: fewer independent pieces give no interval at all
MIN_TAIL = 5  # a percentile needs this many observations beyond it on its rarer side
# How far (in standard deviations of the count below a percentile) a replicate's percentile
# may wander before the window misses it and the replicate falls back to a full sort.
WINDOW_SDS = 4.5
BINS = 32  # bins of that window: a replicate sorts about one of them

# Exit status of `rackscope compare`, declared beside the verdicts they summarise.
EXIT_OK = 0  # no metric regressed
EXIT_REGRESSION = 1  # at least one metric regressed
EXIT_USAGE = 2  # bad flags or unreadable records
EXIT_INCONCLUSIVE = 3  # with --fail-inconclusive: none regressed, at least one inconclusive


def exit_code(verdicts: Iterable[str], fail_inconclusive: bool = False) -> int:
    """The process exit status for the verdicts of one comparison."""
    seen = set(verdicts)
    if "regression" in seen:
        return EXIT_REGRESSION
    if fail_inconclusive and "inconclusive" in seen:
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def decide(low: float, high: float, threshold: float, better: Direction) -> Verdict:
    """The verdict for an interval ``[low, high]`` of a relative change (0.03 is +3 %), given a
    threshold as a fraction and the direction that is better."""
    if low > high:
        raise ValueError(f"interval [{low}, {high}] is reversed")
    good_low, good_high = (low, high) if better == "higher" else (-high, -low)
    if good_high < -threshold:
        return "regression"
    if good_low > threshold:
        return "improvement"
    if -threshold <= good_low and good_high <= threshold:
        return "no change"
    return "inconclusive"


def block_length(n: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Observations per block for a stream of ``n``: about the cube root, at most ``max_blocks`` blocks."""
    if n <= 1:
        return 1
    return max(1, round(math.cbrt(n)), math.ceil(n / max_blocks))


def _cut(n: int, max_blocks: int = MAX_BLOCKS) -> list[tuple[int, int]]:
    size = block_length(n, max_blocks)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


# --- small-sample widening ---------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom, for 0.5 <= p < 1."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, not p={p}, df={df}")
    if df > 100_000:
        return NormalDist().inv_cdf(p)

    def upper_tail(t: float) -> float:  # P(T > t) for t >= 0
        return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while upper_tail(hi) > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if upper_tail(mid) > 1.0 - p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def widening(units: int, confidence: float) -> float:
    """How much wider than the plain percentile interval an interval over ``units`` blocks is drawn."""
    if units < MIN_BLOCKS:
        raise ValueError(f"an interval needs at least {MIN_BLOCKS} blocks, not {units}")
    p = 0.5 + confidence / 2.0
    return t_quantile(p, units - 1) * math.sqrt(units / (units - 1)) / NormalDist().inv_cdf(p)


@dataclass(frozen=True, slots=True)
class Interval:
    """A relative change (0.03 is +3 %) with its confidence interval."""

    change: float
    low: float
    high: float


def change_interval(
    base: float, new: float, base_reps: Sequence[float], new_reps: Sequence[float], units: int, confidence: float
) -> Interval | None:
    """The change ``new / base - 1`` and its interval from paired replicates of both sides;
    ``None`` when the data cannot carry one (a zero base, too few blocks)."""
    if base <= 0.0 or units < MIN_BLOCKS or not base_reps or len(base_reps) != len(new_reps):
        return None
    reps = sorted(n / b - 1.0 for b, n in zip(base_reps, new_reps, strict=True) if b > 0.0)
    if len(reps) < len(base_reps) // 2:
        return None
    change = new / base - 1.0
    alpha = 1.0 - confidence
    factor = widening(units, confidence)
    low = percentile(reps, 100.0 * alpha / 2.0)
    high = percentile(reps, 100.0 * (1.0 - alpha / 2.0))
    # Widened about the observed change, never narrower than the replicates themselves.
    return Interval(change, min(low, change + (low - change) * factor), max(high, change + (high - change) * factor))


# --- throughput and tokens per joule from 1 s buckets ------------------------------------------
@dataclass(frozen=True, slots=True)
class Buckets:
    """One stream of 1 s buckets: output tokens and seconds in each, and joules when measured."""

    tokens: Sequence[float]
    seconds: Sequence[float]
    energy_j: Sequence[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.seconds) != n or (self.energy_j is not None and len(self.energy_j) != n):
            raise ValueError("bucket columns differ in length")


class _Streams:
    """The block structure of a side: per run, per stream, the ids of its blocks (ids index
    the samplers' flat per-block columns, so a replicate is a list of ids)."""

    def __init__(self, lengths: Sequence[Sequence[int]]) -> None:
        streams_total = sum(len(run) for run in lengths)
        self.max_blocks = min(MAX_BLOCKS, max(MIN_STREAM_BLOCKS, SIDE_BLOCKS // max(1, streams_total)))
        self.runs: list[list[list[int]]] = []
        self.spans: list[tuple[int, int]] = []  # per block id: [start, end) inside its stream
        for run in lengths:
            streams = []
            for n in run:
                first = len(self.spans)
                self.spans += self.cut(n)
                streams.append(list(range(first, len(self.spans))))
            self.runs.append(streams)
        self.units = len(self.spans)

    def cut(self, n: int) -> list[tuple[int, int]]:
        """The blocks of a stream of ``n`` observations."""
        return _cut(n, self.max_blocks)

    def draw(self, rng: random.Random) -> list[list[list[int]]]:
        """One replicate: runs drawn with replacement, then each drawn run's streams' blocks."""
        runs = rng.choices(self.runs, k=len(self.runs)) if len(self.runs) > 1 else self.runs
        return [[rng.choices(ids, k=len(ids)) if ids else [] for ids in run] for run in runs]


class RateSampler:
    """Replicates of a side's output tokens/s (a run's is the sum of its streams' rates) and
    output tokens per joule (a run's is its tokens over its joules, over streams with energy);
    a side's value is the mean over its runs."""

    def __init__(self, runs: Sequence[Sequence[Buckets]]) -> None:
        if not runs or any(not run for run in runs):
            raise ValueError("a side needs at least one run with at least one stream")
        self._streams = _Streams([[len(s.tokens) for s in run] for run in runs])
        self.units = self._streams.units
        self._tokens: list[float] = []
        self._seconds: list[float] = []
        self._joules: list[float] = []  # nan for a stream without energy
        for run in runs:
            for s in run:
                energy = s.energy_j if s.energy_j is not None else [math.nan] * len(s.tokens)
                for a, b in self._streams.cut(len(s.tokens)):
                    self._tokens.append(math.fsum(s.tokens[a:b]))
                    self._seconds.append(math.fsum(s.seconds[a:b]))
                    self._joules.append(math.fsum(energy[a:b]))

    def _run_value(self, streams: Iterable[Sequence[int]]) -> tuple[float, float]:
        rate, tokens_e, joules = 0.0, 0.0, 0.0
        for ids in streams:
            tok = math.fsum(map(self._tokens.__getitem__, ids))
            sec = math.fsum(map(self._seconds.__getitem__, ids))
            rate += tok / sec if sec > 0 else 0.0
            energy = math.fsum(map(self._joules.__getitem__, ids))
            if not math.isnan(energy):
                tokens_e += tok
                joules += energy
        return rate, (tokens_e / joules if joules > 0 else math.nan)

    def _side_value(self, runs: Sequence[Sequence[Sequence[int]]]) -> tuple[float, float]:
        values = [self._run_value(run) for run in runs]
        return math.fsum(v[0] for v in values) / len(values), math.fsum(v[1] for v in values) / len(values)

    def point(self) -> tuple[float, float]:
        """(tokens/s, tokens/J) of the side as measured; tokens/J is nan without energy."""
        return self._side_value(self._streams.runs)

    def replicates(self, rng: random.Random, count: int) -> tuple[list[float], list[float]]:
        """``count`` bootstrap replicates of (tokens/s, tokens/J)."""
        pairs = [self._side_value(self._streams.draw(rng)) for _ in range(count)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


# --- latency percentiles from per-request values -----------------------------------------------
class _Window:
    """A band of values around one percentile, cut into bins of about equal counts: for every
    block, how many of its values lie below each bin edge and which lie in each bin."""

    def __init__(self, sorted_blocks: Sequence[list[float]], edges: Sequence[float]) -> None:
        self.edges = list(edges)
        # below[j][block]: values of the block under edges[j]; bins[j][block]: its values in
        # [edges[j], edges[j + 1]).
        self.below: list[list[int]] = [[] for _ in self.edges]
        self.bins: list[list[list[float]]] = [[] for _ in self.edges[1:]]
        for ordered in sorted_blocks:
            cuts = [bisect.bisect_left(ordered, e) for e in self.edges]
            for j, cut in enumerate(cuts):
                self.below[j].append(cut)
            for j in range(len(self.bins)):
                self.bins[j].append(ordered[cuts[j]:cuts[j + 1]])

    def pick(self, ids: Sequence[int], k0: int, k1: int) -> tuple[float, float] | None:
        """The k0-th and k1-th smallest values (0-based) of the blocks ``ids``, or ``None``
        when they are not both inside the band."""
        def below(j: int) -> int:
            return sum(map(self.below[j].__getitem__, ids))

        last = len(self.edges) - 1
        if below(0) > k0 or below(last) <= k1:
            return None
        lo, hi = 0, last  # largest j with below(j) <= k0: below(lo) <= k0 < below(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if below(mid) <= k0:
                lo = mid
            else:
                hi = mid
        end = hi  # first edge past k1
        while below(end) <= k1:
            end += 1
        start = below(lo)
        values = sorted(itertools.chain.from_iterable(
            itertools.chain.from_iterable(map(self.bins[j].__getitem__, ids)) for j in range(lo, end)))
        return values[k0 - start], values[k1 - start]


class QuantileSampler:
    """Replicates of percentiles of a latency pooled over a side's runs and streams.

    A replicate's percentile is read from a band of values around the side's percentile, cut
    into ``BINS`` bins: each block knows how many of its values lie below each bin edge and which
    lie in each bin, so a replicate adds a few counts, finds the bin holding its percentile and
    sorts only that bin's values instead of everything; a replicate whose percentile falls
    outside the band (rare by construction) is sorted in full."""

    def __init__(self, runs: Sequence[Sequence[Sequence[float]]], quantiles: Sequence[float]) -> None:
        if not runs:
            raise ValueError("a side needs at least one run")
        self.quantiles = tuple(quantiles)
        self._streams = _Streams([[len(stream) for stream in run] for run in runs])
        self.units = self._streams.units
        self._values: list[list[float]] = []
        for run in runs:
            for stream in run:
                self._values += [list(stream[a:b]) for a, b in self._streams.cut(len(stream))]
        self._size = [len(v) for v in self._values]
        self._sorted = [sorted(v) for v in self._values]
        pooled = sorted(itertools.chain.from_iterable(self._values))
        self.count = len(pooled)
        self._point = [percentile(pooled, 100.0 * q) if pooled else math.nan for q in self.quantiles]
        self._windows = [self._window(pooled, q) for q in self.quantiles]
        self.fallbacks = 0  # replicates that missed the band (for tests and tuning)

    def _window(self, pooled: Sequence[float], q: float) -> _Window:
        # A pooled percentile over any mix of runs lies between the runs' own percentiles; the
        # margin covers a replicate's wander, measured from how the count below each run's
        # percentile varies from block to block.
        lo, hi = math.inf, -math.inf
        for run in self._streams.runs:
            ids = [i for stream in run for i in stream]
            ordered = pooled if len(self._streams.runs) == 1 else sorted(
                itertools.chain.from_iterable(map(self._values.__getitem__, ids)))
            if not ordered:
                continue
            mark = percentile(ordered, 100.0 * q)
            deviations = [bisect.bisect_left(self._sorted[i], mark) - q * self._size[i] for i in ids]
            margin = math.ceil(WINDOW_SDS * math.sqrt(math.fsum(d * d for d in deviations))) + 2
            k = q * (len(ordered) - 1)
            lo = min(lo, ordered[max(0, math.floor(k) - margin)])
            hi = max(hi, ordered[min(len(ordered) - 1, math.ceil(k) + margin)])
        if not pooled or lo > hi:
            return _Window(self._sorted, [])
        first, last = bisect.bisect_left(pooled, lo), bisect.bisect_right(pooled, hi) - 1
        step = max(1, (last - first) // BINS)
        edges = sorted({pooled[i] for i in range(first, last, step)} | {lo, hi})
        return _Window(self._sorted, edges if len(edges) >= 2 else [])

    def point(self) -> list[float]:
        """The side's percentiles as measured (pooled over its runs)."""
        return list(self._point)

    def replicates(self, rng: random.Random, count: int) -> list[list[float]]:
        """``count`` bootstrap replicates, one list per quantile."""
        out: list[list[float]] = [[] for _ in self.quantiles]
        for _ in range(count):
            ids = [i for run in self._streams.draw(rng) for stream in run for i in stream]
            total = sum(map(self._size.__getitem__, ids))
            full: list[float] | None = None
            for t, q in enumerate(self.quantiles):
                pos = (total - 1) * (100.0 * q) / 100.0  # as stats.percentile computes it, to the bit
                k0 = math.floor(pos)
                k1 = min(k0 + 1, total - 1)
                picked = self._windows[t].pick(ids, k0, k1) if self._windows[t].edges else None
                if picked is not None:
                    v0, v1 = picked
                    out[t].append(v0 + (v1 - v0) * (pos - k0))
                    continue
                self.fallbacks += 1
                if full is None:
                    full = sorted(itertools.chain.from_iterable(map(self._values.__getitem__, ids)))
                out[t].append(percentile(full, 100.0 * q))
        return out

    def enough_for(self, q: float) -> bool:
        """Whether the side holds enough observations beyond ``q`` on its rarer side."""
        return self.count * min(q, 1.0 - q) >= MIN_TAIL and self.units >= MIN_BLOCKS
