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


@pytest.mark.parametrize("length", [241, 255])
def test_an_output_name_near_the_file_systems_limit_is_written(tmp_path, length):
    """A temporary adds ".XXXXXXXX.tmp" to its output's name: cut to fit, it still lands beside the output."""
    target = tmp_path / ("é" * ((length - 3) // 2) + "x" * ((length - 3) % 2) + ".h5")
    assert len(target.name.encode()) == length
    with replaced_atomically(target) as tmp:
        assert len(Path(tmp).name.encode()) <= 255 and Path(tmp).parent == tmp_path
        Path(tmp).write_text("data")
    assert target.read_text() == "data" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("command", [
    ["simulate", "--scenario", "hbm_only", "--set", "workload.decode_tokens=2", "--out"],
    ["trace", "gen", "--model", "mixtral-8x7b", "--tokens", "4", "--out"],
    ["sweep", "sweeps/hit_rate_vs_capacity.toml", "--out"],
    ["paper", "--quiet", "--out"],
])
def test_commands_refuse_an_unwritable_output(cli, a_file, command):
    result = cli(*command, a_file / "out", cwd=ROOT)
    assert_one_line_error(result, "cannot write", "is a file, not a folder")


@pytest.mark.parametrize("command", [
    ["simulate", "--scenario", "hbm_only", "--set", "workload.decode_tokens=2", "--out"],
    ["trace", "gen", "--model", "mixtral-8x7b", "--tokens", "4", "--out"],
])
def test_commands_refuse_an_output_name_too_long_for_the_system(cli, tmp_path, command):
    result = cli(*command, tmp_path / ("n" * 300 + ".h5"), cwd=ROOT)
    assert_one_line_error(result, "cannot write", "File name too long")


def test_train_policy_checks_its_output_first(cli, a_file, tmp_path):
    assert_one_line_error(cli("train-policy", a_file, "--out", tmp_path / "weights"), "*.npz")
    # The output is checked before the trace is read (here it is not a trace at all).
    assert_one_line_error(cli("train-policy", a_file, "--out", a_file / "w.npz"), "cannot write")
    assert_one_line_error(cli("train-policy", a_file, "--out", tmp_path / "w.npz", "--seed", "-1"), "--seed")


def _with_file_size_limit(limit_bytes: int, *args, cwd=None):
    """``python -m tierflow ARGS`` allowed to write files of at most ``limit_bytes`` (writes beyond fail with
    EFBIG, as a full disk fails with ENOSPC)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "tierflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit)


@pytest.mark.parametrize("command", [
    ["trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "20000", "--out"],
    ["simulate", "--quiet", "--set", "model=olmoe-1b-7b", "--set", "hardware=h100-pcie5", "--set", "gpus=1",
     "--set", "workload.decode_tokens=3000", "--out"],
])
def test_a_write_that_runs_out_of_room_is_one_line_and_leaves_nothing(tmp_path, command):
    result = _with_file_size_limit(20_000, *command, tmp_path / "out.h5")
    assert_one_line_error(result, "cannot write", "File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_symbolic_link_is_written_through_and_a_device_is_refused(cli, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "trace.h5"
    target.write_text("old")
    (tmp_path / "link.h5").symlink_to("real/trace.h5")
    cli("trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "10", "--out", tmp_path / "link.h5", check_status=0)
    assert (tmp_path / "link.h5").is_symlink() and target.read_bytes().startswith(b"\x89HDF")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["trace.h5"]
    result = cli("simulate", "--quiet", "--set", "workload.decode_tokens=2", "--out", "/dev/null")
    assert_one_line_error(result, "/dev/null", "not a regular file")
    assert Path("/dev/null").is_char_device()


def test_simulate_will_not_write_over_its_own_inputs(cli, tmp_path):
    trace = tmp_path / "t.h5"
    cli("trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "20", "--out", trace, check_status=0)
    before = trace.read_bytes()
    result = cli("simulate", "--set", "model=olmoe-1b-7b", "--set", "hardware=h100-pcie5", "--set", "gpus=1",
                 "--set", "workload.decode_tokens=2", "--trace", trace, "--out", trace)
    assert_one_line_error(result, "is the trace being simulated")
    assert trace.read_bytes() == before
    # Nor over any other file the run reads: the scenario file, a prefetcher's training trace, policy weights.
    scenario = tmp_path / "s.toml"
    scenario.write_text('model = "olmoe-1b-7b"\nhardware = "h100-pcie5"\ngpus = 1\n')
    common = ["--set", "workload.decode_tokens=2", "--trace", trace]
    for args, fragment, target in (
            (["--scenario", scenario], "the scenario file", scenario),
            (["--scenario", scenario, "--set", "prefetch.policy=expert_map", "--set",
              f"prefetch.params.train_trace={tmp_path / 'train.h5'}"], "prefetch.params.train_trace", "train.h5"),
            (["--scenario", scenario, "--set", "cache.policy=learned", "--set",
              f"cache.params.weights={tmp_path / 'w.npz'}"], "cache.params.weights", "w.npz")):
        target = tmp_path / target
        if not target.exists():
            target.write_bytes(before)
        kept = target.read_bytes()
        result = cli("simulate", *args, *common, "--out", target)
        assert_one_line_error(result, fragment, "would be overwritten")
        assert target.read_bytes() == kept


@pytest.mark.parametrize("args, fragment", [
    (["trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "100000000000", "--out", "t.h5"],
     "the generator's tables and plan would need"),
    (["trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "10", "--set", "num_topics=100000000", "--out", "t.h5"],
     "the generator's tables and plan would need"),
    (["simulate", "--set", "model=olmoe-1b-7b", "--set", "hardware=h100-pcie5", "--set", "gpus=1", "--set",
      "workload.decode_tokens=2", "--set", "prefetch.policy=expert_map", "--set", f"prefetch.params.capacity={10**12}"],
     "a store of 1,000,000,000,000 expert maps would need"),
    (["train-policy", "t.h5", "--out", "w.npz", "--hidden", "1000000000"], "--hidden"),
    (["trace", "import", "--format", "per-step", "x.jsonl", "--num-experts", str(2**40), "--out", "t.h5"],
     "--num-experts"),
])
def test_sizes_beyond_memory_are_refused_before_allocating(cli, tmp_path, args, fragment):
    assert_one_line_error(cli(*args, cwd=tmp_path), fragment)
    assert list(tmp_path.iterdir()) == []


H5_FILLER = """
import sys
import numpy as np
from tierflow.atomic import H5Output
try:
    with H5Output(sys.argv[1]) as f:
        for i in range(40):
            f.create_dataset(f"s{i}", data=np.random.default_rng(i).random(int(sys.argv[2])), compression="gzip")
except OSError as error:
    print("OSError", error.errno, error.filename)
"""


@pytest.mark.parametrize("size", [300, 3000, 30000])
def test_hdf5_written_until_the_room_runs_out_stops_with_one_oserror(tmp_path, size):
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "out.h5"
    result = subprocess.run([sys.executable, "-c", H5_FILLER, out.with_name("out.h5.abcd1234.tmp"), str(size)],
                            capture_output=True, text=True, preexec_fn=limit)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split() == ["OSError", "27", str(out)]  # EFBIG, naming the output


def test_a_run_long_enough_for_a_progress_bar_still_fails_in_one_line(tmp_path):
    """The bar shows from the first piece of work done, so input refused before any is the only line on stderr
    (click prints a bar's label at once when stderr is not a terminal)."""
    from conftest import run_cli

    assert_one_line_error(run_cli("simulate", "--set", "workload.decode_tokens=100", "--set",
                                  "cache.capacity_experts=8"), "smaller than one layer's working set")


def test_a_progress_bar_opens_at_the_first_update_only(capsys):
    from tierflow.progress import progress_bar

    with progress_bar(10, "never shown"):
        pass
    with pytest.raises(ValueError), progress_bar(10, "never shown"):
        raise ValueError("refused before any work")
    assert capsys.readouterr().err == ""
    with progress_bar(10, "working") as bar:
        bar.update(0)
        bar.update(10)
    assert "working" in capsys.readouterr().err


def test_text_with_a_nul_is_refused_and_a_byte_order_mark_is_fine(tmp_path):
    from conftest import run_cli

    nul = tmp_path / "nul.toml"  # a TOML escape: no command line can carry a NUL
    nul.write_text('[cache]\npolicy = "learned"\nparams = {weights = "w\\u0000.npz"}\n')
    assert_one_line_error(run_cli("simulate", "--scenario", nul),
                          "cache.params.weights: a NUL character is not allowed")
    scenario = tmp_path / "bom.toml"
    scenario.write_bytes(b"\xef\xbb\xbf" + b'model = "olmoe-1b-7b"\nhardware = "h100-pcie5"\ngpus = 1\n'
                         b'placement = "ssd"\n[workload]\ndecode_tokens = 4\n')
    assert run_cli("simulate", "--scenario", scenario, "--json", check_status=0).stdout.startswith("{")


def test_a_refused_import_prints_its_error_line_only(tmp_path):
    """The importer's warnings (here: the missing --model makes it infer num_experts) come once the trace is
    written; an import refused later prints only its error."""
    from conftest import run_cli

    log = tmp_path / "log.jsonl"
    log.write_text('{"problem_id": 1, "layer": 0, "token_idx": 0, "experts": [0, 1], "gating_probs": [0.6, 0.4]}\n')
    done = run_cli("trace", "import", "--format", "per-step", log, "--out", tmp_path / "a.h5", check_status=0)
    assert "tierflow: warning: num_experts not given" in done.stderr
    refused = run_cli("trace", "import", "--format", "per-step", log, "--model", "olmoe-1b-7b",
                      "--out", tmp_path / "b.h5")
    assert_one_line_error(refused, "olmoe-1b-7b")
