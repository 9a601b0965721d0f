"""Rack run settings: agent lists and URLs, and the spec's bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from rackscope.errors import ConfigError
from rackscope.rack.spec import AnswerCaps, RackRunSpec, normalize_agent_url, parse_agents


def test_agent_urls_are_normalized() -> None:
    assert normalize_agent_url("n01:9470") == "http://n01:9470"
    assert normalize_agent_url(" https://n02.example:443/agent/ ") == "https://n02.example:443/agent"
    for bad in ("", "ftp://n01:1", "http://:80", "http://n01:99999", "http://n01:80/?x=1"):
        with pytest.raises(ConfigError):
            normalize_agent_url(bad)


def test_a_bad_agent_url_is_shown_without_its_credentials() -> None:
    with pytest.raises(ConfigError) as caught:
        normalize_agent_url("http://ops:hunter2@n01:99999")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_agents("http://ops:hunter2@n01:1,http://ops:hunter2@n01:1")
    assert "listed twice" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_agents_from_list_and_file(tmp_path: Path) -> None:
    f = tmp_path / "agents.txt"
    f.write_text("# the rack\nhttp://10.0.0.1:9470\n\n  10.0.0.2:9470   # second node\n#10.0.0.9:1\n")
    assert parse_agents("http://a:1, b:2", f) == [
        "http://a:1",
        "http://b:2",
        "http://10.0.0.1:9470",
        "http://10.0.0.2:9470",
    ]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_agents("a:1,http://a:1")
    with pytest.raises(ConfigError, match="no agents"):
        parse_agents("", None)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_agents(None, tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"straggler_threshold": 1.5}, "straggler"),
        ({"rack_run_id": "../evil"}, "run id"),
        ({"call_timeout_s": 0.0}, "call_timeout_s"),
        ({"collect_timeout_s": -1.0}, "collect_timeout_s"),
        ({"cancel_timeout_s": float("inf")}, "cancel_timeout_s"),
        ({"timeout_s": 0.0}, "--timeout"),
        ({"lead_time_s": 4000.0}, "--lead-time"),
        ({"caps": AnswerCaps(answer_bytes=0)}, "answer_bytes"),
    ],
)
def test_spec_bounds(change: dict[str, object], message: str) -> None:
    spec = RackRunSpec(agents=["http://a:1"], run={}, output_dir=Path("x"))
    for name, value in change.items():
        setattr(spec, name, value)
    with pytest.raises(ConfigError, match=message):
        spec.validate()


def test_default_deadline_follows_the_duration() -> None:
    spec = RackRunSpec(agents=["http://a:1"], run={"duration_s": 10}, output_dir=Path("x")).validate()
    assert spec.deadline_after_start_s() == pytest.approx(10 * 1.5 + 60)
    assert RackRunSpec(agents=["http://a:1"], run={}, output_dir=Path("x")).deadline_after_start_s() is None
    spec = RackRunSpec(agents=["http://a:1"], run={"duration_s": 10}, output_dir=Path("x"), timeout_s=5.0)
    assert spec.deadline_after_start_s() == 5.0
