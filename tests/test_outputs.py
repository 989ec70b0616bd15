"""Outputs: a destination that cannot be written is one line and exit status 2, found before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_one_line_error

from tierflow.atomic import OutputError, check_writable, output_dir, replaced_atomically

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


def test_a_path_through_a_file_is_refused(a_file):
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(a_file / "out.h5")
    with pytest.raises(OutputError, match="cannot write"):
        output_dir(a_file / "sub")
    with pytest.raises(OutputError), replaced_atomically(a_file / "deeper" / "out.h5"):
        pytest.fail("never reached: the temporary cannot be made")


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(OutputError, match="Is a directory"):
        check_writable(tmp_path)


def test_missing_folders_are_created_and_nothing_is_left(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.h5"
    check_writable(target)
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    assert output_dir(tmp_path / "dir" / "sub").is_dir()


@pytest.mark.parametrize("command", [
    ["simulate", "--scenario", "hbm_only", "--set", "workload.decode_tokens=2", "--out"],
    ["trace", "gen", "--model", "mixtral-8x7b", "--tokens", "4", "--out"],
    ["sweep", "sweeps/hit_rate_vs_capacity.toml", "--out"],
    ["paper", "--quiet", "--out"],
])
def test_commands_refuse_an_unwritable_output(cli, a_file, command):
    result = cli(*command, a_file / "out", cwd=ROOT)
    assert_one_line_error(result, "cannot write", "is a file, not a folder")


def test_train_policy_checks_its_output_first(cli, a_file, tmp_path):
    assert_one_line_error(cli("train-policy", a_file, "--out", tmp_path / "weights"), "*.npz")
    # The output is checked before the trace is read (here it is not a trace at all).
    assert_one_line_error(cli("train-policy", a_file, "--out", a_file / "w.npz"), "cannot write")
    assert_one_line_error(cli("train-policy", a_file, "--out", tmp_path / "w.npz", "--seed", "-1"), "--seed")
