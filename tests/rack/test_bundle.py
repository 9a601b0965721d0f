"""The results bundle: atomic writes, a used folder refused, agent names made safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rackscope.errors import ConfigError, ResultError
from rackscope.rack.bundle import Bundle, node_file, safe_name


def test_bundle_writes_atomically_and_refuses_a_used_folder(tmp_path: Path) -> None:
    b = Bundle(tmp_path / "out")
    b.write_json("nodes/n01/run.json", {"a": 1})
    b.write_bytes("rack.json", b"{}\n")
    assert json.loads((tmp_path / "out/nodes/n01/run.json").read_text()) == {"a": 1}
    assert not list((tmp_path / "out").rglob(".*.tmp.*"))
    with pytest.raises(ConfigError, match="already holds"):
        Bundle(tmp_path / "out")


def test_a_folder_that_cannot_be_made_is_a_result_error(tmp_path: Path) -> None:
    b = Bundle(tmp_path / "out")
    (tmp_path / "out/nodes").write_text("a file where a folder should be")
    with pytest.raises(ResultError, match="cannot create"):
        b.write_json(node_file("n01", "run.json"), {"a": 1})


def test_agent_names_become_safe_file_names() -> None:
    assert safe_name("n01") == "n01"
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("..") == "node"
    assert safe_name("\x1b[31mred") == "31mred"
    assert len(safe_name("x" * 500)) == 64
    assert node_file("n01", "agent.log") == "nodes/n01/agent.log"
