"""The distribution installs one top-level package, ``rackscope``, holding every folder's modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("agent", "runner", "rack", "dashboards")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (built,) = out.glob("rackscope-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_rackscope_as_its_only_top_level_package(wheel: zipfile.ZipFile) -> None:
    (top_level,) = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["rackscope"]
    roots = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"rackscope"}


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_module_of_a_folder_is_in_the_wheel_under_rackscope(wheel: zipfile.ZipFile, folder: str) -> None:
    names = set(wheel.namelist())
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py"))
    assert modules, folder
    missing = [m for m in modules if f"rackscope/{m}" not in names]
    assert missing == []
    assert f"rackscope/{folder}/py.typed" in names


def test_the_checkout_links_each_folder_into_the_namespace() -> None:
    for folder in FOLDERS:
        link = ROOT / "rackscope" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), folder


def test_installed_modules_resolve_to_the_folders_outside_the_source_tree(tmp_path: Path) -> None:
    # Run from an unrelated directory holding its own `agent` and `runner` packages: a user's project
    # with such folders must not shadow ours, and ours must not claim the bare names.
    for name in ("agent", "runner"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("USER = True\n")
    code = (
        "import rackscope.agent.cli, rackscope.runner.cli, rackscope.rack.cli, rackscope.dashboards.cli\n"
        "import agent, runner\n"
        "print(rackscope.agent.cli.__name__, getattr(agent, 'USER', False), getattr(runner, 'USER', False))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["rackscope.agent.cli", "True", "True"]
