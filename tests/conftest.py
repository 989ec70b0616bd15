"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import settings

# CI machines are shared and noisy: no per-example deadline, and a fixed profile so runs are comparable.
settings.register_profile("tierflow", deadline=None, max_examples=60)
settings.load_profile("tierflow")


def run_cli(*args, cwd=None, check_status=None):
    """Run ``python -m tierflow ARGS`` in a subprocess, as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "tierflow", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )
    if check_status is not None:
        assert result.returncode == check_status, result.stderr
    return result


def assert_one_line_error(result, *fragments):
    """Bad input: exit status 2, exactly one line on stderr, no traceback, mentioning each fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierflow: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def scenario_with(base: dict, **changes):
    """A scenario from a base table with dotted-key changes (``**{"cache.capacity_experts": 100}``)."""
    import json

    from tierflow.config import scenario_from_table

    table = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (table.setdefault(section, {}) if section else table)[name] = value
    return scenario_from_table(table)


@pytest.fixture
def cli():
    return run_cli
