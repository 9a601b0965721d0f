"""`rackscope dashboards build|check`: the committed generated files are up to date, and check
catches a stale or hand-edited one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rackscope.cli import main
from rackscope.dashboards import build

ROOT = Path(__file__).resolve().parents[2]


def test_committed_generated_files_are_up_to_date() -> None:
    assert build.check(ROOT) == [], "run `rackscope dashboards build` and commit the result"


def test_render_covers_every_generated_file() -> None:
    rendered = set(build.render(ROOT))
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "dashboards" / "generated").glob("*.json")}
    committed |= {str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "kubernetes" / "generated").glob("*")}
    assert committed <= rendered
    assert "dashboards/rules/rackscope.rules.yml" in rendered
    assert "dashboards/provisioning/dashboards/rackscope.yml" in rendered


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source tree with only the hand-edited inputs; build writes the rest."""
    (tmp_path / "deploy").mkdir()
    (tmp_path / "dashboards" / "rules").mkdir(parents=True)
    shutil.copy(ROOT / "dashboards" / "rules" / "baselines.yml", tmp_path / "dashboards" / "rules")
    return tmp_path


@pytest.mark.slow
def test_build_then_check_then_tamper(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboards", "check", "--root", str(tree)]) == 1  # nothing generated yet
    assert main(["dashboards", "build", "--root", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "wrote dashboards/generated/rack-overview.json" in out
    assert main(["dashboards", "check", "--root", str(tree)]) == 0
    assert main(["dashboards", "build", "--root", str(tree)]) == 0
    assert "everything up to date" in capsys.readouterr().out

    # Each generated file equals the committed one: one source, one output.
    for rel in build.render(tree):
        assert (tree / rel).read_text() == (ROOT / rel).read_text(), rel

    # A hand edit of a dashboard is caught...
    path = tree / "dashboards" / "generated" / "rack-overview.json"
    dashboard = json.loads(path.read_text())
    dashboard["panels"][1]["title"] = "edited in the UI"
    path.write_text(json.dumps(dashboard))
    assert build.check(tree) == ["dashboards/generated/rack-overview.json"]
    assert main(["dashboards", "check", "--root", str(tree)]) == 1
    assert "out of date: dashboards/generated/rack-overview.json" in capsys.readouterr().err

    # ...and so is a baseline change the PrometheusRule has not picked up.
    baselines = tree / "dashboards" / "rules" / "baselines.yml"
    baselines.write_text(baselines.read_text().replace("vector(1100948)", "vector(865000)"))
    assert build.check(tree) == ["dashboards/generated/rack-overview.json",
                                 "deploy/kubernetes/generated/prometheusrule.yaml"]
    build.build(tree)
    assert build.check(tree) == []
    assert "vector(865000)" in (tree / "deploy" / "kubernetes" / "generated" / "prometheusrule.yaml").read_text()


def test_check_refuses_a_directory_that_is_not_a_source_tree(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboards", "check", "--root", str(tmp_path)]) == 2
    assert "not a rackscope source tree" in capsys.readouterr().err
