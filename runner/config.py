"""The run settings, declared once, and what is derived from them.

Each field of ``RunConfig`` carries its whole declaration: type (the annotation), default,
bounds, help, flag and parser. From it come the strict checks of ``RunConfig.from_dict`` (what
the agent's API and the CLIs both go through), the flags of ``rackscope run`` and of
``rackscope rack run`` (``add_flags``), the agent's request model (``rackscope.agent.run_models``)
and the record's config section (``RunConfig.to_dict``). Adding a setting touches this file only.

Every number has an upper bound that a run on one node can use (a request body naming
``concurrency: 100000000`` is refused, not attempted); identifiers match ``IDENTIFIER_PATTERN``
so they are safe as file names; strings are length-limited and free of control characters.

At a little over 600 lines this is the one module kept past the house limit on purpose: about
half of it is the declaration table itself, and splitting the declaration from the checks and
flag derivation it feeds would put one concept back into two places.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import socket
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError
from rackscope.runner.datasets import DISTRIBUTIONS, FILE_FORMATS, MAX_SEQUENCE_TOKENS
from rackscope.runner.engines.registry import ENGINE_NAMES
from rackscope.runner.results.window import Limits
from rackscope.urls import redact_url

SCENARIOS = ("offline", "server", "concurrency", "sweep")
SWEEP_OVER = ("concurrency", "rate")
ENGINES = ENGINE_NAMES  # every registered engine, live (runner.engines.registry)
APIS = ("completions", "chat")
# MLPerf Inference Llama2-70B latency limits (p99), seconds.
PRESETS: dict[str, Limits] = {
    "server": Limits(ttft_s=2.0, tpot_s=0.2),
    "interactive": Limits(ttft_s=0.45, tpot_s=0.04),
}
# MLPerf's Llama2-70B dataset shape (OpenOrca): the simulated engine is calibrated on it.
DEFAULT_INPUT_LEN = 684
DEFAULT_OUTPUT_LEN = 294
DEFAULT_MAX_CONSECUTIVE_ERRORS = 20
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_REQUEST_DEADLINE_S = 1800.0

# --- bounds (one agent, one node) --------------------------------------------------------------
MAX_CONCURRENCY = 16_384  # requests in flight: TensorRT-LLM's largest batch on eight GPUs
MAX_REQUESTS = 1_000_000  # measured (or warm-up) requests: every one keeps a record in memory
MAX_DURATION_S = 7 * 86_400.0
MAX_WARMUP_S = 86_400.0
MAX_RATE_PER_S = 10_000.0  # Poisson arrivals per second on one node
MAX_SWEEP_POINTS = 64
MAX_LATENCY_LIMIT_S = 3_600.0  # TTFT / TPOT limits
MAX_REQUEST_TIME_S = 86_400.0  # per-request silence timeout and whole-request deadline
MAX_LENGTH_SPREAD = 10.0  # coefficient of variation (normal, lognormal)
MAX_GPUS = 1_024
MAX_WORKERS = 256
MAX_SEED = 2**63 - 1
MAX_ERRORS_IN_A_ROW = 1_000_000
# Prompt tokens the closed-loop scenarios may hold in flight at once (concurrency x mean input
# length) for engines that are sent text: about 800 MB of prompt text.
MAX_PROMPT_TOKENS_IN_FLIGHT = 2**27
# What an offline run keeps in flight at most without offline_inflight (see runner.scenarios).
OFFLINE_INFLIGHT_CEILING = MAX_CONCURRENCY

IDENTIFIER_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
# No control characters (C0, DEL, C1): nothing that splits a log line or a header.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f-\x9f]+$"
MAX_TEXT_CHARS = 256
MAX_MODEL_CHARS = 1_024  # a model name, hub id or checkpoint path
MAX_PATH_CHARS = 4_096
MAX_URL_CHARS = 2_048
MAX_SECRET_CHARS = 4_096
_SHOWN_CHARS = 40  # of a rejected value, in an error message


# --- durations -----------------------------------------------------------------------------------
_SECONDS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_seconds(text: str) -> float:
    """``"10"``, ``"10s"``, ``"450ms"``, ``"5m"``, ``"2h"``, ``"1d"`` -> seconds."""
    m = _SECONDS.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text[:_SHOWN_CHARS]!r} is not a duration (e.g. 10, 10s, 450ms, 5m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_warmup(text: str) -> tuple[str, float]:
    """``auto`` | ``0``/``none`` | ``N`` requests | ``Ns`` seconds."""
    t = text.strip().lower()
    if t == "auto":
        return "auto", 0.0
    if t in ("0", "none", "off"):
        return "none", 0.0
    if t.isdigit():
        return "requests", float(int(t))
    try:
        return "seconds", parse_seconds(t)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"--warmup takes a request count (20), a duration (5s), auto or 0, not {text[:_SHOWN_CHARS]!r}"
        ) from None


def warmup_fields(warmup: tuple[str, float]) -> dict[str, Any]:
    """A parsed ``--warmup`` as the three settings it stands for."""
    kind, amount = warmup
    return {
        "warmup_requests": int(amount) if kind == "requests" else 0,
        "warmup_s": amount if kind == "seconds" else 0.0,
        "warmup_auto": kind == "auto",
    }


# --- the declaration -----------------------------------------------------------------------------
_SPEC = "rackscope.setting"
_SAME = object()  # flag default: the setting's own default


@dataclass(frozen=True)
class Setting:
    """One run setting. ``kind`` and ``optional`` come from the field's annotation."""

    help: str
    flag: str | None = None  # None: no flag of its own
    group: str = "scenario"  # engine, scenario, dataset, output: where --help lists it
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # minimum itself is not allowed (durations, rates)
    choices: Sequence[str] | None = None  # a live view for engines (registered at any time)
    pattern: str = TEXT_PATTERN  # strings only
    rule: str = ""  # what ``pattern`` asks for, in words (error messages)
    max_length: int = MAX_TEXT_CHARS  # strings: characters; lists: items
    url: bool = False  # an http(s) URL with a host; shown and stored redacted
    secret: bool = False  # never written out: the record says only whether it was set
    parse: Callable[[str], Any] | None = None  # a flag's text -> value (default: by kind)
    metavar: str | None = None
    unit: str = ""
    flag_default: Any = _SAME  # what the flag shows when left out, if not the default
    rack: bool = False  # a rack run sends it to every agent
    remote: bool = True  # the agent's API accepts it (False: the agent sets it itself)
    via: str | None = None  # set through a flag shared with other settings (--warmup)
    # Filled in from the field:
    name: str = ""
    kind: str = ""  # int, float, bool, str, floats
    optional: bool = False
    default: Any = None

    def bounds_text(self) -> str:
        """The bounds in words, for help texts and API descriptions."""
        if self.maximum is None:
            return ""
        low = "" if self.minimum is None else _number(self.minimum)
        if self.exclusive_minimum and self.minimum == 0:
            return f"more than 0, at most {_number(self.maximum)}{self.unit}"
        return f"{low} to {_number(self.maximum)}{self.unit}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if value.is_integer() else f"{value:g}"


def setting(
    default: Any = None, *, default_factory: Callable[[], Any] | None = None, **spec: Any
) -> Any:
    """A ``RunConfig`` field and its declaration (see ``Setting``)."""
    declared = Setting(**spec)
    meta = {_SPEC: declared}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    # Secrets, and URLs that may carry credentials, stay out of repr() and so out of logs.
    return field(default=default, metadata=meta, repr=not (declared.secret or declared.url))


def _default_node() -> str:
    return socket.gethostname().split(".")[0] or "node"


_DURATION: dict[str, Any] = {"parse": parse_seconds, "metavar": "SECONDS", "unit": " s"}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, as the CLI flags and the agent's ``POST /v1/runs`` body give it.

    ``from_dict`` validates; every key is a field name below. ``api_key`` is never written
    out by ``to_dict``, and a URL's credentials are shown as ``***``.
    """

    # --- engine ---
    engine: str = setting("sim", flag="--engine", group="engine", choices=ENGINES, help="what serves the requests",
                          rack=True)
    model: str = setting(
        "llama2-70b", flag="--model", group="engine", flag_default=None, max_length=MAX_MODEL_CHARS, rack=True,
        help="model name (sim: llama2-70b; openai: the server's first model when left out; trtllm/hf: a "
             "checkpoint path or hub id)",
    )
    url: str | None = setting(
        None, flag="--url", group="engine", url=True, pattern=URL_PATTERN, rule="an http:// or https:// URL",
        max_length=MAX_URL_CHARS, rack=True, help="OpenAI-compatible server root, e.g. http://127.0.0.1:8000 (openai)",
    )
    api: str = setting("completions", flag="--api", group="engine", choices=APIS, rack=True,
                       help="which OpenAI API (openai)")
    api_key: str | None = setting(None, flag="--api-key", group="engine", secret=True, max_length=MAX_SECRET_CHARS,
                                  help="bearer token (openai); default: the OPENAI_API_KEY variable")
    request_timeout_s: float = setting(
        DEFAULT_REQUEST_TIMEOUT_S, flag="--request-timeout", group="engine", minimum=0, exclusive_minimum=True,
        maximum=MAX_REQUEST_TIME_S, rack=True, **_DURATION,
        help="longest silence from the server before a request fails (openai)",
    )
    request_deadline_s: float = setting(
        DEFAULT_REQUEST_DEADLINE_S, flag="--request-deadline", group="engine", minimum=0, exclusive_minimum=True,
        maximum=MAX_REQUEST_TIME_S, rack=True, **_DURATION,
        help="longest time one request may take from start to end, e.g. 30m (openai)",
    )
    workers: int = setting(1, flag="--workers", group="engine", minimum=1, maximum=MAX_WORKERS,
                           help="client processes sharing the load (openai)")
    # The server's own metrics page, read while the run lasts (the record's server view). Local
    # only (remote=False): a URL from the network would let any API caller make the agent read
    # any host and port it can reach and learn from the outcome; an agent-hosted run reads only
    # the origin of the server it was told to load (docs/security.md).
    engine_metrics: str | None = setting(
        None, flag="--engine-metrics", group="engine", url=True, pattern=URL_PATTERN,
        rule="an http:// or https:// URL (--no-engine-metrics reads none)", max_length=MAX_URL_CHARS, remote=False,
        metavar="URL",
        help="the server's own metrics page, read while the run lasts (openai; default: the --url server's "
             "origin + /metrics; vLLM, SGLang and trtllm-serve pages are told apart by their content)",
    )
    engine_metrics_off: bool = setting(False, flag="--no-engine-metrics", group="engine", remote=False,
                                       help="do not read the server's metrics page (openai)")
    gpu_model: str | None = setting(None, flag="--gpu-model", group="engine",
                                    help="simulated GPU model (sim; default gb300) or a label for the record")
    gpus: int | None = setting(None, flag="--gpus", group="engine", minimum=1, maximum=MAX_GPUS,
                               help="GPUs behind the engine (sim: how many to simulate, default 4); gives per-GPU "
                                    "throughput")
    # --- scenario ---
    scenario: str = setting("offline", flag="--scenario", choices=SCENARIOS, rack=True, help="load pattern")
    requests: int | None = setting(None, flag="--requests", minimum=1, maximum=MAX_REQUESTS, rack=True,
                                   help="measured requests (first bound reached ends the run)")
    duration_s: float | None = setting(
        None, flag="--duration", minimum=0, exclusive_minimum=True, maximum=MAX_DURATION_S, rack=True, **_DURATION,
        help="measured seconds, e.g. 60 or 5m (first bound reached ends the run)",
    )
    warmup_requests: int = setting(0, via="--warmup", minimum=0, maximum=MAX_REQUESTS, rack=True,
                                   help="warm-up requests excluded from results")
    warmup_s: float = setting(0.0, via="--warmup", minimum=0, maximum=MAX_WARMUP_S, unit=" s", rack=True,
                              help="warm-up seconds excluded from results")
    # Duration-bounded offline runs without an explicit warm-up measure from the end of the
    # ramp-up (when the output rate stops climbing), as a steady-state figure should.
    warmup_auto: bool = setting(True, via="--warmup", rack=True,
                                help="start measuring when the output rate stops climbing (duration-bounded offline)")
    concurrency: int | None = setting(None, flag="--concurrency", minimum=1, maximum=MAX_CONCURRENCY, rack=True,
                                      help="requests in flight (concurrency)")
    rate: float | None = setting(None, flag="--rate", minimum=0, exclusive_minimum=True, maximum=MAX_RATE_PER_S,
                                 unit="/s", rack=True, help="Poisson arrivals per second (server)")
    sweep: tuple[float, ...] = setting(
        (), flag="--sweep", minimum=0, exclusive_minimum=True, maximum=MAX_CONCURRENCY, max_length=MAX_SWEEP_POINTS,
        metavar="LIST", rack=True,
        help="comma-separated concurrencies (or rates with --sweep-over rate), e.g. 1,8,64 (sweep); "
             f"at most {MAX_SWEEP_POINTS} points",
    )
    sweep_over: str = setting("concurrency", flag="--sweep-over", choices=SWEEP_OVER, rack=True,
                              help="what --sweep lists")
    preset: str | None = setting(None, flag="--preset", choices=tuple(PRESETS), rack=True,
                                 help="MLPerf latency limits: server 2 s / 200 ms, interactive 450 ms / 40 ms "
                                      "(p99 TTFT / TPOT)")
    ttft_limit_s: float | None = setting(
        None, flag="--ttft-limit", minimum=0, exclusive_minimum=True, maximum=MAX_LATENCY_LIMIT_S, rack=True,
        **_DURATION, help="p99 time-to-first-token limit, e.g. 2s or 450ms (default: from the preset)",
    )
    tpot_limit_s: float | None = setting(
        None, flag="--tpot-limit", minimum=0, exclusive_minimum=True, maximum=MAX_LATENCY_LIMIT_S, rack=True,
        **_DURATION, help="p99 time-per-output-token limit, e.g. 200ms (default: from the preset)",
    )
    offline_inflight: int | None = setting(None, flag="--offline-inflight", minimum=1, maximum=MAX_CONCURRENCY,
                                           rack=True,
                                           help="cap on requests in flight in offline runs (default: engine dependent)")
    max_consecutive_errors: int = setting(
        DEFAULT_MAX_CONSECUTIVE_ERRORS, flag="--max-consecutive-errors", minimum=1, maximum=MAX_ERRORS_IN_A_ROW,
        rack=True, help="stop the run (incomplete) after this many failed requests in a row",
    )
    seed: int = setting(0, flag="--seed", minimum=0, maximum=MAX_SEED, rack=True,
                        help="seed of arrivals and synthetic lengths")
    # Simulated engine only: start in steady state (first batch part-way through generation)
    # instead of filling every batch from cold; see runner.engines.sim.SimEngine.
    sim_warm_start: bool = setting(False, flag="--warm-start",
                                   help="sim engine: start in steady state, as if it had been serving (skips the "
                                        "cold ramp)")
    # --- dataset ---
    dataset: str | None = setting(None, flag="--dataset", group="dataset", metavar="FILE", max_length=MAX_PATH_CHARS,
                                  rack=True,
                                  help="prompt file (default: synthetic prompts); through an agent, a path inside "
                                       "its --data-dir")
    dataset_format: str = setting("jsonl", flag="--dataset-format", group="dataset", choices=FILE_FORMATS, rack=True,
                                  help='jsonl: {"prompt", "max_tokens"|"output_tokens"}; trtllm: trtllm-bench lines')
    input_len: int = setting(DEFAULT_INPUT_LEN, flag="--input-len", group="dataset", minimum=1,
                             maximum=MAX_SEQUENCE_TOKENS, unit=" tokens", rack=True,
                             help="mean synthetic prompt length in tokens")
    output_len: int = setting(DEFAULT_OUTPUT_LEN, flag="--output-len", group="dataset", minimum=1,
                              maximum=MAX_SEQUENCE_TOKENS, unit=" tokens", rack=True,
                              help="mean synthetic output length in tokens")
    length_dist: str = setting("fixed", flag="--length-dist", group="dataset", choices=DISTRIBUTIONS, rack=True,
                               help="distribution of synthetic lengths around the means")
    length_spread: float = setting(
        0.25, flag="--length-spread", group="dataset", minimum=0, maximum=MAX_LENGTH_SPREAD, rack=True,
        help="half-width (uniform, below 1) or coefficient of variation (normal, lognormal) of the lengths",
    )
    # --- identity and output ---
    run_id: str | None = setting(None, flag="--run-id", group="output", pattern=IDENTIFIER_PATTERN,
                                 rule=IDENTIFIER_RULE, help="run identifier (default: random)")
    rack: str = setting("r1", flag="--rack", group="output", pattern=IDENTIFIER_PATTERN, rule=IDENTIFIER_RULE,
                        remote=False, help="rack label on the record and metrics")
    node: str = setting(default_factory=_default_node, flag="--node", group="output", pattern=IDENTIFIER_PATTERN,
                        rule=IDENTIFIER_RULE, remote=False, flag_default=None,
                        help="node label (default: the host name)")

    # --- construction ------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(SETTINGS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build and validate; ``ConfigError`` (only) names the offending key. ``None`` means
        default. ``<secret>_set`` keys, which ``to_dict`` writes instead of secrets, are ignored."""
        if not isinstance(data, Mapping):
            raise ConfigError("a run configuration must be a JSON object")
        ignored = {f"{s.name}_set" for s in SETTINGS.values() if s.secret}
        unknown = [k for k in data if k not in SETTINGS and k not in ignored]
        if unknown:
            shown = ", ".join(sorted(_show(k) for k in unknown)[:5])
            raise ConfigError(f"unknown run setting(s): {shown}; known: {', '.join(SETTINGS)}")
        kwargs = {name: check(SETTINGS[name], value) for name, value in data.items()
                  if name in SETTINGS and value is not None}
        return cls(**kwargs).validate()

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        """The record's config section: every setting, secrets as ``<name>_set``, URLs redacted."""
        out: dict[str, Any] = {}
        for s in SETTINGS.values():
            value = getattr(self, s.name)
            if s.secret:
                out[f"{s.name}_set"] = bool(value)  # an empty key is no key
            elif s.kind == "floats":
                out[s.name] = list(value)
            elif s.url and value is not None:
                out[s.name] = redact_url(value)
            else:
                out[s.name] = value
        return out

    @staticmethod
    def public_body(body: Mapping[str, Any]) -> dict[str, Any]:
        """A partial run body (as a rack run sends it) as it may be shown or stored: secrets
        as ``<name>_set``, URLs redacted, the other keys as given."""
        out: dict[str, Any] = {}
        for name, value in body.items():
            s = SETTINGS.get(name)
            if s is not None and s.secret:
                out[f"{name}_set"] = bool(value)
            elif s is not None and s.url and isinstance(value, str):
                out[name] = redact_url(value)
            else:
                out[name] = value
        return out

    # --- checks ------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Every field against its declaration, then the rules between fields."""
        for s in SETTINGS.values():
            value = getattr(self, s.name)
            if value is None and not s.optional:
                raise ConfigError(f"{s.name} must be given")
            if value is not None:
                check(s, value)
        _cross_checks(self)
        return self

    # --- derived -------------------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.requests is not None or self.duration_s is not None

    def limits(self) -> Limits | None:
        """Latency limits: explicit ones over the preset; the server preset by default for
        the server scenario and rate sweeps; none otherwise."""
        explicit = self.ttft_limit_s is not None or self.tpot_limit_s is not None
        rate_based = self.scenario == "server" or (self.scenario == "sweep" and self.sweep_over == "rate")
        if self.preset is None and not explicit and not rate_based:
            return None
        base = PRESETS[self.preset or "server"]
        return Limits(
            ttft_s=self.ttft_limit_s if self.ttft_limit_s is not None else base.ttft_s,
            tpot_s=self.tpot_limit_s if self.tpot_limit_s is not None else base.tpot_s,
        )

    def inflight_ceiling(self) -> int | None:
        """Most requests a closed-loop run holds in flight at once (None: open loop, server)."""
        if self.scenario == "concurrency":
            return self.concurrency
        if self.scenario == "sweep" and self.sweep_over == "concurrency":
            return int(max(self.sweep, default=1))
        if self.scenario == "offline":
            return self.offline_inflight or OFFLINE_INFLIGHT_CEILING
        return None


def _declarations() -> dict[str, Setting]:
    hints = typing.get_type_hints(RunConfig)
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(RunConfig):
        spec = f.metadata[_SPEC]
        kind, optional = _kind(hints[f.name])
        factory = f.default_factory
        default = factory() if callable(factory) else f.default
        out[f.name] = dataclasses.replace(spec, name=f.name, kind=kind, optional=optional, default=default)
    return out


def _kind(annotation: Any) -> tuple[str, bool]:
    args = set(typing.get_args(annotation)) if typing.get_origin(annotation) is not tuple else set()
    optional = type(None) in args
    base = next(iter(args - {type(None)})) if optional else annotation
    if typing.get_origin(base) is tuple:
        return "floats", optional
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    return names[base], optional


SETTINGS: dict[str, Setting] = _declarations()


# --- checking one value ------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A rejected value as an error message shows it: never more than a few dozen characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a number of more than 64 bits"  # repr of a huge int is slow, or refused
    if isinstance(value, list | tuple | dict | set) and len(value) > _SHOWN_CHARS:
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check(s: Setting, value: Any) -> Any:
    """``value`` as setting ``s`` holds it (int, float, bool, str or a tuple of floats), or a
    ``ConfigError`` saying why not. Never anything else: this is what callers' input meets."""
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{s.name} must be true or false, not {_show(value)}")
        return value
    if s.kind == "str":
        return _check_str(s, value)
    if s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{s.name} must be a whole number, not {_show(value)}")
        return _in_bounds(s, value, s.name)
    if s.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{s.name} must be a number, not {_show(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{s.name} must be at most {_number(s.maximum or 0)}{s.unit}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{s.name} must be a finite number, not {_show(value)}")
        return _in_bounds(s, number, s.name)
    return _check_floats(s, value)


def _in_bounds(s: Setting, value: float, what: str) -> Any:
    if s.minimum is not None:
        if s.exclusive_minimum and value <= s.minimum:
            raise ConfigError(f"{what} must be positive" if s.minimum == 0 else f"{what} must exceed {s.minimum:g}")
        if value < s.minimum:
            raise ConfigError(f"{what} must be at least {_number(s.minimum)}")
    if s.maximum is not None and value > s.maximum:
        raise ConfigError(f"{what} must be at most {_number(s.maximum)}{s.unit}")
    return value


def _check_str(s: Setting, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{s.name} must be a string, not {_show(value)}")
    if s.choices is not None:
        if value not in s.choices:
            raise ConfigError(f"{s.name} must be one of {', '.join(s.choices)}, not {_show(value)}")
        return value
    if len(value) > s.max_length:
        raise ConfigError(f"{s.name} must be at most {s.max_length:,} characters, not {len(value):,}")
    if re.fullmatch(s.pattern, value) is None:
        rule = s.rule or "text without control characters"
        raise ConfigError(f"{s.name} must be {rule}, not {_show(value)}")
    if s.url:
        _check_url(s.name, value)
    return value


def _check_url(name: str, value: str) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {_show(redact_url(value))}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, not {_show(redact_url(value))}")


def _check_floats(s: Setting, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        if len(value) > s.max_length * 32:
            raise ConfigError(f"{s.name} must list at most {s.max_length} numbers")
        items: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{s.name} must be a list of numbers, not {_show(value)}")
    if len(items) > s.max_length:
        raise ConfigError(f"{s.name} must list at most {s.max_length} numbers, not {len(items)}")
    out = []
    for item in items:
        number = _number_from(item)
        if number is None:
            raise ConfigError(f"{s.name} must be a list of numbers; {_show(item)} is not one")
        out.append(_in_bounds(s, number, f"each {s.name} point"))
    return tuple(out)


def _number_from(item: Any) -> float | None:
    if isinstance(item, bool) or not isinstance(item, int | float | str):
        return None
    try:
        number = float(item)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _cross_checks(c: RunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(not (c.warmup_requests and c.warmup_s), "give the warm-up in requests or in seconds, not both")
    need(c.workers == 1 or c.engine == "openai", "workers > 1 needs the openai engine")
    need(not c.sim_warm_start or c.engine == "sim", "sim_warm_start applies to the sim engine only")
    need(c.length_dist != "uniform" or c.length_spread < 1.0,
         "length_spread for a uniform distribution must be below 1")
    if c.engine == "openai":
        need(bool(c.url), "the openai engine needs a server URL (url / --url)")
    need(c.engine_metrics is None or c.engine == "openai", "engine_metrics (--engine-metrics) applies to the "
                                                          "openai engine only")
    need(c.engine_metrics is None or not c.engine_metrics_off,
         "give engine_metrics (--engine-metrics URL) or engine_metrics_off (--no-engine-metrics), not both")
    if c.scenario == "server":
        need(c.rate is not None, "the server scenario needs a target rate (rate / --rate)")
    if c.scenario == "concurrency":
        need(c.concurrency is not None, "the concurrency scenario needs concurrency (--concurrency)")
    if c.scenario == "sweep":
        need(bool(c.sweep), "the sweep scenario needs a list of points (sweep / --sweep)")
        if c.sweep_over == "concurrency":
            need(
                all(float(v).is_integer() for v in c.sweep),
                f"sweep concurrencies must be whole numbers from 1 to {MAX_CONCURRENCY:,}",
            )
        else:
            need(all(v <= MAX_RATE_PER_S for v in c.sweep), f"sweep rates must be at most {MAX_RATE_PER_S:g}/s")
    inflight = c.inflight_ceiling()
    if c.engine != "sim" and not c.dataset and inflight is not None:
        # The simulated engine is sent lengths only; the others get every prompt as text.
        need(
            inflight * c.input_len <= MAX_PROMPT_TOKENS_IN_FLIGHT,
            f"{inflight:,} requests in flight x {c.input_len:,} prompt tokens exceeds "
            f"{MAX_PROMPT_TOKENS_IN_FLIGHT:,} prompt tokens in flight: lower concurrency "
            "(or offline_inflight) or input_len",
        )


# --- flags ---------------------------------------------------------------------------------------
def rack_settings() -> tuple[str, ...]:
    """The settings a rack run sends to every agent (node identity and GPUs are each agent's own)."""
    return tuple(name for name, s in SETTINGS.items() if s.rack)


def _flag_type(s: Setting) -> Callable[[str], Any]:
    """The flag's parser: the setting's own (durations) or its kind's, then its checks, so a bad
    value exits 2 naming the flag."""

    def parse(text: str) -> Any:
        if s.kind in ("floats", "str"):
            raw: Any = text
        elif s.parse is not None:
            raw = s.parse(text)
        elif s.kind == "int":
            try:
                raw = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text[:_SHOWN_CHARS]!r} is not a whole number") from None
        else:
            raw = _number_from(text)
            if raw is None:
                raise argparse.ArgumentTypeError(f"{text[:_SHOWN_CHARS]!r} is not a number")
        try:
            return check(s, raw)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = s.name  # argparse names the type in some messages
    return parse


def add_flags(
    where: Callable[[str], argparse._ActionsContainer], names: Iterable[str]
) -> None:
    """Add the flags of the settings ``names`` (in declaration order) to the argument group
    ``where(group name)`` returns. Settings set through a shared flag (``--warmup``) get it once."""
    wanted = set(names)
    shared: set[str] = set()
    for s in SETTINGS.values():
        if s.name not in wanted:
            continue
        container = where(s.group)
        if s.via is not None:
            if s.via not in shared:
                shared.add(s.via)
                container.add_argument(
                    s.via, type=parse_warmup, default=("auto", 0.0), metavar="N|Ns|auto|0",
                    help="warm-up excluded from results: N requests, N seconds (5s), auto (duration-bounded "
                         "offline runs start measuring when the output rate stops climbing) or 0",
                )
            continue
        if s.flag is None:
            continue
        default = s.default if s.flag_default is _SAME else s.flag_default
        text = s.help + (f"; {s.bounds_text()}" if s.bounds_text() else "")
        if s.kind == "bool":
            container.add_argument(s.flag, dest=s.name, action="store_true", default=None, help=text)
        elif s.choices is not None:
            container.add_argument(s.flag, dest=s.name, choices=s.choices, default=default, help=text)
        else:
            container.add_argument(s.flag, dest=s.name, type=_flag_type(s), default=default, metavar=s.metavar,
                                   help=text)


def values_from_args(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of the settings ``names`` as ``add_flags`` parsed them (None: not given)."""
    wanted = tuple(names)
    out = {name: getattr(args, name, None) for name in wanted if SETTINGS[name].via is None}
    if any(SETTINGS[name].via == "--warmup" for name in wanted):
        out.update(warmup_fields(args.warmup))
    return out


__all__ = [
    "APIS",
    "ENGINES",
    "IDENTIFIER_PATTERN",
    "PRESETS",
    "SCENARIOS",
    "SETTINGS",
    "SWEEP_OVER",
    "RunConfig",
    "Setting",
    "add_flags",
    "check",
    "parse_seconds",
    "parse_warmup",
    "rack_settings",
    "values_from_args",
]
