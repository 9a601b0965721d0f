"""Per-rack baselines from measurements: reading and writing dashboards/rules/baselines.yml, and ``rackscope baseline``.

The file holds one pair of recording rules per rack, read by the regression alerts: expected
output tokens/s and output tokens per joule. ``rackscope baseline set RECORD`` takes both from a
measured run or rack record, labels them with where they came from (``baseline_source``,
``baseline_run_id``, ``baseline_measured_at``), rewrites the file atomically under a lock and
regenerates the Kubernetes PrometheusRule the way ``rackscope dashboards build`` does. The
reader is strict: a rule it does not understand stops it, rather than being dropped on rewrite.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.dashboards import names as n
from rackscope.errors import ConfigError, ResultError

SOURCE_LABEL = "baseline_source"
RUN_ID_LABEL = "baseline_run_id"
MEASURED_AT_LABEL = "baseline_measured_at"
PROVENANCE_LABELS = (SOURCE_LABEL, RUN_ID_LABEL, MEASURED_AT_LABEL)
GROUP_NAME = "rackscope.baselines"
RACK_PATTERN = re.compile(IDENTIFIER_PATTERN)  # the identifiers agents accept
_VECTOR = re.compile(r"^\s*vector\(\s*([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*\)\s*$")
TOKENS_PER_S_DECIMALS = 1
TOKENS_PER_J_DECIMALS = 4


@dataclass(frozen=True, slots=True)
class Baseline:
    """What a healthy rack is expected to deliver, and (when set from a record) where that came from."""

    rack: str
    tokens_per_s: float
    tokens_per_j: float | None = None
    source: str | None = None
    run_id: str | None = None
    measured_at: str | None = None

    def __post_init__(self) -> None:
        if RACK_PATTERN.match(self.rack) is None:
            raise ConfigError(f"rack name {self.rack[:40]!r} must be letters, digits, '.', '_' or '-' (1-128)")
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s > 0):
            raise ConfigError(f"rack {self.rack}: baseline output tokens/s must be positive, not {self.tokens_per_s}")
        if self.tokens_per_j is not None and not (math.isfinite(self.tokens_per_j) and self.tokens_per_j > 0):
            raise ConfigError(f"rack {self.rack}: baseline tokens per joule must be positive, not {self.tokens_per_j}")

    def provenance(self) -> dict[str, str]:
        values = (self.source, self.run_id, self.measured_at)
        return {k: v for k, v in zip(PROVENANCE_LABELS, values, strict=True) if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"rack": self.rack, "output_tokens_per_s": self.tokens_per_s, "output_tokens_per_j": self.tokens_per_j,
                "source": self.source, "run_id": self.run_id, "measured_at": self.measured_at}


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # PyYAML comes with the dev extra, as for `rackscope dashboards build`
        raise ConfigError(f"{exc}: baselines need PyYAML: pip install -e '.[dev]'") from exc
    return yaml


def baselines_path(root: Path) -> Path:
    from rackscope.dashboards import build, rules

    return root / build.RULES_DIR / rules.BASELINES_FILE


# --- reading ---------------------------------------------------------------------------------------
def _value(text: Any, where: str) -> float:
    m = _VECTOR.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"{where}: expr {text!r} is not vector(NUMBER); fix it by hand")
    return float(m.group(1))


def parse(doc: Any, where: str) -> list[Baseline]:
    """The baselines of a parsed rule file; ``ConfigError`` on anything else in it."""
    if not isinstance(doc, Mapping) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        raise ConfigError(f"{where}: expected a rule file with one 'groups' list")
    found: dict[str, dict[str, Any]] = {}
    for group in doc["groups"]:
        if not isinstance(group, Mapping) or group.get("name") != GROUP_NAME or set(group) != {"name", "rules"}:
            raise ConfigError(f"{where}: expected only the group {GROUP_NAME!r} with its rules")
        for i, rule in enumerate(group["rules"] or []):
            at = f"{where}: rule {i + 1}"
            if not isinstance(rule, Mapping) or set(rule) != {"record", "expr", "labels"}:
                raise ConfigError(f"{at}: expected record, expr and labels only")
            labels = rule["labels"]
            if not isinstance(labels, Mapping) or not isinstance(labels.get("rack"), str):
                raise ConfigError(f"{at}: labels must name the rack")
            extra = set(labels) - {"rack", *PROVENANCE_LABELS}
            if extra or not all(isinstance(v, str) for v in labels.values()):
                raise ConfigError(f"{at}: unexpected labels {sorted(extra) or dict(labels)}")
            rack = labels["rack"]
            entry = found.setdefault(rack, {"labels": {}})
            key = {n.RACK_BASELINE_TPS: "tps", n.RACK_BASELINE_TPJ: "tpj"}.get(rule["record"])
            if key is None:
                raise ConfigError(f"{at}: unknown record {rule['record']!r}")
            if key in entry:
                raise ConfigError(f"{at}: rack {rack} has two {rule['record']} rules")
            entry[key] = _value(rule["expr"], at)
            entry["labels"].update({k: v for k, v in labels.items() if k != "rack"})
    out = []
    for rack, entry in found.items():
        if "tps" not in entry:
            raise ConfigError(f"{where}: rack {rack} has a tokens-per-joule baseline but no output tokens/s one")
        labels = entry["labels"]
        out.append(Baseline(rack, entry["tps"], entry.get("tpj"), labels.get(SOURCE_LABEL),
                            labels.get(RUN_ID_LABEL), labels.get(MEASURED_AT_LABEL)))
    return sorted(out, key=lambda b: b.rack)


def read(path: Path) -> list[Baseline]:
    """The baselines in ``path`` (none when it does not exist)."""
    yaml = _yaml()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the baselines {path}: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return [] if doc is None else parse(doc, str(path))


# --- writing ---------------------------------------------------------------------------------------
def _number(value: float, decimals: int) -> str:
    """Fixed-point without trailing zeros: 1100948, 11, 4.4685 (never 1.10095e+06)."""
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def groups(baselines: Sequence[Baseline]) -> dict[str, Any]:
    """The rule groups for ``baselines``, one rule per rack and value, racks in name order."""
    rules = []
    for b in sorted(baselines, key=lambda b: b.rack):
        labels = {"rack": b.rack, **b.provenance()}
        tps = _number(b.tokens_per_s, TOKENS_PER_S_DECIMALS)
        rules.append({"record": n.RACK_BASELINE_TPS, "expr": f"vector({tps})", "labels": dict(labels)})
        if b.tokens_per_j is not None:
            rules.append({"record": n.RACK_BASELINE_TPJ,
                          "expr": f"vector({_number(b.tokens_per_j, TOKENS_PER_J_DECIMALS)})", "labels": dict(labels)})
    return {"groups": [{"name": GROUP_NAME, "rules": rules}]}


def header() -> str:
    from rackscope.dashboards.rules import RuleParams

    p = RuleParams()
    share = f"{p.regression_ratio * 100:g} %"
    return (
        "# Per-rack baselines: what a healthy rack is expected to deliver, one pair of recording rules\n"
        "# per rack (output tokens/s and output tokens per joule). Set them from a measured run or rack\n"
        "# record with `rackscope baseline set RECORD --rack RACK`, which rewrites this file and the\n"
        "# Kubernetes PrometheusRule, and list them with `rackscope baseline show`. A hand edit works\n"
        "# too (then run `rackscope dashboards build`). A baseline set from a record carries where it\n"
        f"# came from as labels: {', '.join(PROVENANCE_LABELS)}.\n"
        "#\n"
        f"# The throughput- and perf-per-watt-regression alerts fire below {share} of these values *and*\n"
        f"# below {share} of the rack's own maximum over the last {p.recent_max_window}; a rack without\n"
        "# a baseline is judged on its recent maximum alone. The Rack overview draws the tokens/s\n"
        "# baseline as a dashed line.\n"
        "#\n"
        "# Shipped with r1 entered by hand: one GB300 NVL72 rack (18 nodes x 4 GPUs), Llama2-70B FP4\n"
        "# offline, TensorRT-LLM: 1,100,948 output tokens/s (Azure ND GB300 v6, MLPerf Inference v5.1,\n"
        "# Nov 2025); about 11 tokens per joule of GPU energy at ~1.34 kW per GPU.\n"
    )


def _describe(b: Baseline) -> str:
    tpj = "no tokens/J" if b.tokens_per_j is None else f"{b.tokens_per_j:,.4g} tokens/J"
    if b.source is None:
        origin = "entered by hand"
    else:
        origin = f"from {b.source}" + (f", run {b.run_id}" if b.run_id else "") + \
            (f", measured {b.measured_at}" if b.measured_at else "")
    tps = f"{b.tokens_per_s:,.0f}" if b.tokens_per_s.is_integer() else f"{b.tokens_per_s:,.1f}"
    return f"# {b.rack}: {tps} output tokens/s, {tpj}; {origin}\n"


def render(baselines: Sequence[Baseline]) -> str:
    """The whole file: the header, then per rack a comment line and its rules."""
    from rackscope.dashboards.rules import to_yaml

    yaml = _yaml()
    doc = groups(baselines)
    text = [header(), f"groups:\n- name: {GROUP_NAME}\n  rules:\n" if baselines else to_yaml(doc)]
    rules = doc["groups"][0]["rules"]
    for b in sorted(baselines, key=lambda b: b.rack):
        text.append("  " + _describe(b))
        mine = [r for r in rules if r["labels"]["rack"] == b.rack]
        text += ["  " + line + "\n" for line in to_yaml(mine).splitlines()]
    out = "".join(text)
    if yaml.safe_load(out) != doc:  # the comments must not have changed what Prometheus reads
        raise AssertionError("rendered baselines do not parse back to their rules")
    return out


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of the baselines: two `baseline set` at once keep both."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write(root: Path, baselines: Sequence[Baseline]) -> list[str]:
    """Write the baselines file and regenerate the PrometheusRule from it, each atomically;
    the relative paths that changed."""
    from rackscope.dashboards import build
    from rackscope.fileio import write_bytes

    path = baselines_path(root)
    changed = []
    text = render(baselines)
    if not path.is_file() or path.read_text() != text:
        write_bytes(path, text.encode())
        changed.append(str(path.relative_to(root)))
    rel = f"{build.K8S_GENERATED_DIR}/prometheusrule.yaml"
    rule = build.render(root, with_dashboards=False)[rel]
    target = root / rel
    if not target.is_file() or target.read_text() != rule:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, rule.encode())
        changed.append(rel)
    return changed


def put(root: Path, baseline: Baseline) -> list[str]:
    """Add or replace one rack's baseline; the relative paths that changed."""
    path = baselines_path(root)
    if not path.parent.is_dir() or not (root / "deploy").is_dir():
        raise ConfigError(f"{root} is not a rackscope source tree (no deploy/ or {path.parent}): pass --root")
    with _locked(path.parent):
        kept = [b for b in read(path) if b.rack != baseline.rack]
        return write(root, [*kept, baseline])


# --- from a record ---------------------------------------------------------------------------------
def _source_name(path: Path) -> str:
    """The record as the label names it: its file name, with its folder for a bundle's rack.json."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def from_record(path: str | Path, rack: str | None = None, allow_partial: bool = False) -> Baseline:
    """A baseline from a run or rack record: its output tokens/s and tokens per joule."""
    from rackscope.runner.measured import RACK_FAMILY, load_comparable

    path = Path(path)
    record = load_comparable(path)
    summary = record["summary"]
    is_rack = str(record["schema"]).startswith(RACK_FAMILY + "/")
    partial = summary.get("complete") is not True or (is_rack and record.get("state") != "finished")
    if partial and not allow_partial:
        why = summary.get("stop_reason") or record.get("state") or "complete: false"
        raise ConfigError(f"{path} is an incomplete record ({why}): a partial run understates the rack; "
                          "pass --allow-partial to use it anyway")
    named = record.get("rack") if is_rack else (record.get("config") or {}).get("rack")
    if rack is None:
        if not isinstance(named, str) or not named or "," in named:
            raise ConfigError(f"{path} names no single rack ({named!r}): pass --rack")
        rack = named
    tps, tpj = summary.get("output_tokens_per_s"), summary.get("output_tokens_per_j")
    if not isinstance(tps, int | float) or isinstance(tps, bool) or not tps > 0:
        raise ConfigError(f"{path}: the record measured no output tokens/s ({tps!r})")
    run_id = record.get("rack_run_id") if is_rack else record.get("run_id")
    ended = record.get("ended_at") or record.get("created_at")
    return Baseline(
        rack, float(tps),
        float(tpj) if isinstance(tpj, int | float) and not isinstance(tpj, bool) and tpj > 0 else None,
        _source_name(path), str(run_id) if run_id else None, str(ended) if isinstance(ended, str) else None,
    )


# --- the command -----------------------------------------------------------------------------------
def _root(arg: Path | None) -> Path:
    from rackscope.dashboards import build

    return (arg or build.default_root()).resolve()


def show_table(baselines: Sequence[Baseline]) -> str:
    header = ("rack", "output tokens/s", "tokens/J", "source", "run", "measured")
    body = [(b.rack, f"{b.tokens_per_s:,.1f}", "-" if b.tokens_per_j is None else f"{b.tokens_per_j:,.4f}",
             b.source or "(entered by hand)", b.run_id or "-", b.measured_at or "-") for b in baselines]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    right = {1, 2}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             .rstrip() for r in (header, *body)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import orjson

    root = _root(args.root)
    try:
        if args.action == "set":
            baseline = from_record(args.record, args.rack, args.allow_partial)
            changed = put(root, baseline)
            print(_describe(baseline)[2:].rstrip())
            for rel in changed:
                print(f"wrote {rel}")
            if not changed:
                print("baselines unchanged")
            return 0
        baselines = read(baselines_path(root))
    except (ConfigError, ResultError) as exc:
        print(f"rackscope baseline: error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(orjson.dumps([b.to_json() for b in baselines], option=orjson.OPT_INDENT_2).decode())
    else:
        print(show_table(baselines) if baselines else f"no baselines in {baselines_path(root)}")
    return 0
