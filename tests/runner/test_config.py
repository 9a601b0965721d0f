"""The run settings' one declaration against everything derived from it: the ``rackscope run``
and ``rackscope rack run`` flags, the API's JSON schema, the record's config section and the
checks of ``RunConfig.from_dict``; then property tests of those checks."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rackscope.agent.run_models import RunBody
from rackscope.cli import build_parser
from rackscope.errors import ConfigError
from rackscope.rack.cli import RUN_FIELDS
from rackscope.runner.config import SETTINGS, RunConfig, Setting, check, parse_seconds

NUMERIC = [s for s in SETTINGS.values() if s.kind in ("int", "float", "floats")]


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


RUN = subparser("run")
RACK_RUN = subparser("rack", "run")


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: a for a in parser._actions for option in a.option_strings}


def beyond(s: Setting) -> float:
    """A value just past the setting's upper bound."""
    assert s.maximum is not None
    return s.maximum + 1 if s.kind == "int" else s.maximum * 1.5


def as_flag_value(s: Setting, value: float) -> list[str]:
    text = str(int(value)) if s.kind == "int" else repr(float(value))
    return [s.flag or "", text]


# --- one declaration, every place ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_appears_everywhere_with_the_same_bounds_and_choices(name: str) -> None:
    s = SETTINGS[name]
    record = RunConfig.from_dict({"engine": "openai", "url": "http://127.0.0.1:1"}).to_dict()
    assert (f"{name}_set" if s.secret else name) in record
    schema = RunBody.model_json_schema()["properties"]
    for parser, wanted in ((RUN, True), (RACK_RUN, s.rack)):
        flags = actions(parser)
        flag = s.via or s.flag
        assert flag is not None, f"{name} has no flag"
        if not wanted:  # a rack run may still have a flag of that name for itself (--run-id)
            continue
        assert flag in flags, (parser.prog, flag)
        if s.via is None:
            assert flags[flag].dest == name
            assert flags[flag].choices == s.choices
    if not s.remote:
        assert name not in schema
        return
    prop = schema[name]["anyOf"][0]
    assert prop["type"] == {"int": "integer", "float": "number", "floats": "array", "bool": "boolean",
                            "str": "string"}[s.kind]
    if s.choices is not None:
        assert tuple(prop["enum"]) == s.choices
    elif s.kind == "str":
        assert (prop["maxLength"], prop["pattern"]) == (s.max_length, s.pattern)
    if s.kind == "floats":
        assert prop["maxItems"] == s.max_length
        prop = prop["items"]
    if s.kind in ("int", "float", "floats"):
        assert prop["maximum"] == s.maximum
        low = "exclusiveMinimum" if s.exclusive_minimum else "minimum"
        assert prop[low] == s.minimum


def test_rack_runs_forward_the_declared_settings_only() -> None:
    assert set(RUN_FIELDS) == {n for n, s in SETTINGS.items() if s.rack}
    assert not {"rack", "node", "gpus", "gpu_model", "api_key", "run_id"} & set(RUN_FIELDS)
    assert {"request_timeout_s", "request_deadline_s", "warmup_s", "duration_s"} <= set(RUN_FIELDS)


@pytest.mark.parametrize("s", NUMERIC, ids=lambda s: s.name)
def test_every_bound_is_enforced_by_flags_api_and_from_dict(s: Setting) -> None:
    assert s.maximum is not None and s.minimum is not None, f"{s.name} needs documented bounds"
    top, past = s.maximum, beyond(s)
    extra = {"scenario": "sweep"} if s.kind == "floats" else {}
    wrap = (lambda v: [v]) if s.kind == "floats" else (lambda v: v)
    top_value = int(top) if s.kind == "int" else top
    past_value = int(past) if s.kind == "int" else past
    assert check(s, wrap(top_value)) is not None
    with pytest.raises(ConfigError, match=re.escape(s.name)):
        RunConfig.from_dict({**extra, s.name: wrap(past_value)})
    if s.remote:
        RunBody.model_validate({s.name: wrap(top_value)})
        with pytest.raises(ValidationError):
            RunBody.model_validate({s.name: wrap(past_value)})
    parsers = [RUN, RACK_RUN] if s.rack else [RUN]
    if s.flag is None:
        return
    for parser in parsers:
        assert getattr(parser.parse_args(as_flag_value(s, top)), s.name) == (
            (float(top),) if s.kind == "floats" else top
        )
        with pytest.raises(SystemExit):
            parser.parse_args(as_flag_value(s, past))


def test_durations_parse_the_same_on_both_commands() -> None:
    for parser in (RUN, RACK_RUN):
        args = parser.parse_args(["--request-timeout", "2s", "--ttft-limit", "450ms", "--request-deadline", "10m",
                                  "--duration", "1d"])
        assert (args.request_timeout_s, args.ttft_limit_s, args.request_deadline_s, args.duration_s) == (
            2.0, pytest.approx(0.45), 600.0, 86_400.0)
    assert parse_seconds("2h") == 7200.0


def test_help_shows_bounds_and_defaults() -> None:
    text = RUN.format_help()
    assert "1 to 16,384" in text and "default: 1800.0" in text and "--request-deadline" in text


# --- the checks as properties ----------------------------------------------------------------------
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                                  max_size=3),
                    max_leaves=8)


def near(s: Setting) -> st.SearchStrategy[Any]:
    """Values around what setting ``s`` accepts: its bounds and just past them, its choices,
    wrong types."""
    wrong = st.booleans() | st.text(max_size=5) | st.none() | st.lists(st.integers(), max_size=2)
    if s.kind == "int":
        low, high = int(s.minimum or 0), int(s.maximum or 0)
        return st.integers(low - 2, low + 2) | st.integers(high - 2, high + 2) | st.integers() | wrong
    if s.kind == "float":
        low, high = float(s.minimum or 0), float(s.maximum or 0)
        return st.floats(low - 1, high * 1.1) | st.sampled_from([low, high, math.inf, math.nan, -0.0]) | wrong
    if s.kind == "floats":
        item = st.floats(-1, (s.maximum or 1) * 1.1) | st.integers(-1, 20_000) | st.text(max_size=4)
        return st.lists(item, max_size=(s.max_length + 2)) | st.text(max_size=20) | wrong
    if s.kind == "bool":
        return st.booleans() | st.integers(0, 1) | st.none()
    if s.choices is not None:
        return st.sampled_from(s.choices) | st.text(max_size=8)
    return (st.text(max_size=12) | st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)
            | st.sampled_from(["http://127.0.0.1:1", "http://u:p@h:1/v1", "ftp://x", "../x", "a\nb"]))


BODIES = st.fixed_dictionaries({}, optional={name: near(s) for name, s in SETTINGS.items()})


def respects_declaration(config: RunConfig) -> None:
    for s in SETTINGS.values():
        value = getattr(config, s.name)
        if value is None:
            assert s.optional, s.name
            continue
        values = list(value) if s.kind == "floats" else [value]
        if s.kind == "floats":
            assert len(values) <= s.max_length
        for v in values:
            if s.kind in ("int", "float", "floats"):
                assert not isinstance(v, bool) and math.isfinite(v)
                assert v <= (s.maximum or 0), s.name
                assert v > (s.minimum or 0) if s.exclusive_minimum else v >= (s.minimum or 0), s.name
            if s.kind == "str":
                assert len(v) <= s.max_length and (s.choices is None or v in s.choices)
                assert re.fullmatch(s.pattern, v) or s.choices, s.name


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES | st.dictionaries(st.text(max_size=10) | st.integers(), JSON, max_size=4))
def test_from_dict_only_raises_config_error_and_what_it_accepts_is_in_bounds(body: dict[Any, Any]) -> None:
    try:
        config = RunConfig.from_dict(body)
    except ConfigError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert len(refusal) < 1200  # a refusal never carries the input at length
        return
    respects_declaration(config)
    # The record's config reads back as the same config, except secrets: the record keeps only
    # whether one was set, never the value, so reading it back cannot bring the value back.
    public = config.to_dict()
    again = RunConfig.from_dict(public).to_dict()
    secrets = {f"{s.name}_set" for s in SETTINGS.values() if s.secret}
    assert {k: v for k, v in again.items() if k not in secrets} == {k: v for k, v in public.items() if k not in secrets}
    assert all(again[k] is False for k in secrets)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_api_model_accepts_exactly_what_the_declaration_accepts(data: st.DataObject) -> None:
    s = data.draw(st.sampled_from([s for s in SETTINGS.values() if s.remote]))
    value = data.draw(near(s))
    if value is None or (s.kind == "floats" and isinstance(value, str)):
        return  # None means "default" to both; a comma list is the command line's spelling only
    try:
        check(s, value)
        declared = True
    except ConfigError:
        declared = False
    try:
        RunBody.model_validate({s.name: value})
        api = True
    except ValidationError:
        api = False
    if s.url and api and not declared:
        return  # the API's pattern asks for http(s)://; that a host follows is checked by from_dict
    assert api == declared, (s.name, value)
