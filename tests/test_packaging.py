"""Packaging: every package is listed, and a plain (non-editable) install carries scenarios and traces."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_src_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT / "src").parts)
        for path in (ROOT / "src").rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    return next(out.glob("tierflow-*.whl"))


def test_wheel_carries_scenarios_and_traces(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    scenarios = {p.name for p in (ROOT / "scenarios").glob("*.toml")}
    assert {f"tierflow/scenarios/{name}" for name in scenarios} <= names
    assert "tierflow/traces_bundled/olmoe-routing-stats/routing_counts.json" in names


def test_plain_install_works_from_any_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    code = (
        "import tierflow, pathlib; from tierflow.config import load_scenario, scenario_names;"
        "from tierflow.trace.calibration import real_counts_path;"
        "print(pathlib.Path(tierflow.__file__).parent.parent);"
        "print(sorted(scenario_names())); print(load_scenario('ssd_prefetch').name); print(real_counts_path().is_file())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert Path(out[0]) == target
    assert "ssd_prefetch" in out[1] and out[2] == "ssd_prefetch" and out[3] == "True"


def test_module_entry_point_and_help():
    result = run_cli("--help", check_status=0)
    for command in ("simulate", "trace", "catalog"):
        assert command in result.stdout
