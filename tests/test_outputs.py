"""Outputs: a destination that cannot be written is one line and exit status 2, found before any work."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from tierflow.atomic import H5Output, OutputError, atomic_write, check_writable, output_dir, replaced_atomically

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


@pytest.mark.parametrize("command", [
    ["simulate", "--scenario", "hbm_only", "--set", "workload.decode_tokens=2", "--out"],
    ["trace", "gen", "--model", "mixtral-8x7b", "--tokens", "4", "--out"],
    ["trace", "import", "--format", "per-step", "missing.jsonl", "--out"],
    ["train-policy", "missing.h5", "--out"],
])
def test_an_output_file_named_like_a_folder_is_refused_not_written_as_a_file(cli, tmp_path, command):
    result = cli(*command, f"{tmp_path / 'results'}/", cwd=ROOT)
    assert_one_line_error(result, "names a folder; give the file's path")
    assert list(tmp_path.iterdir()) == []


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


# What an output held before a run that fails to replace it; any run's new file differs from it.
PREVIOUS = b"the previous output: a failed or interrupted write leaves these bytes as they are\n"

SMALL_LOG = ('{"problem_id": 1, "layer": 0, "token_idx": 0, "experts": [0, 1], "gating_probs": [0.6, 0.4]}\n'
             '{"problem_id": 1, "layer": 0, "token_idx": 1, "experts": [2, 1], "gating_probs": [0.7, 0.3]}\n')


def _small_trace(path):
    from tierflow.trace.format import write_trace
    from tierflow.trace.synth import generate_arrays

    arrays = generate_arrays(4, 16, 2, 300, seed=3)
    write_trace(path, arrays["experts"], arrays["sequence_id"], model="test", num_experts=16, source="test",
                gate_scores=arrays["gate_scores"])


@pytest.mark.parametrize("command, out", [
    (["simulate", "--quiet", "--set", "model=olmoe-1b-7b", "--set", "hardware=h100-pcie5", "--set", "gpus=1",
      "--set", "workload.decode_tokens=20", "--out"], "out.h5"),
    (["trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "20", "--out"], "out.h5"),
    (["trace", "import", "--format", "per-step", "log.jsonl", "--num-experts", "8", "--out"], "out.h5"),
    (["train-policy", "small.h5", "--epochs", "1", "--tokens", "30", "--fractions", "0.25", "--hidden", "2",
      "--quiet", "--out"], "out.npz"),
], ids=["simulate", "trace gen", "trace import", "train-policy"])
def test_an_existing_output_is_kept_byte_for_byte_when_a_write_runs_out_of_room(tmp_path, command, out):
    """Each command that writes an output, run over an existing one with room for 2,000 bytes per file (its new
    file needs more, so the write fails midway): one error line, the existing file holds exactly its previous
    bytes, and the folder holds exactly what it held before (no temporary left)."""
    (tmp_path / "log.jsonl").write_text(SMALL_LOG)
    _small_trace(tmp_path / "small.h5")
    (tmp_path / out).write_bytes(PREVIOUS)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _with_file_size_limit(2_000, *command, out, cwd=tmp_path)
    assert_one_line_error(result, "File too large")
    assert (tmp_path / out).read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"),
                                   ValueError("a bug in the writer")], ids=["interrupt", "full disk", "bug"])
def test_atomic_write_failing_midway_keeps_the_existing_file(tmp_path, error):
    """A writer that writes part of its file, then raises (an interrupt, a full disk, a bug): the same exception
    propagates, the destination holds exactly its previous bytes and the temporary is removed."""
    target = tmp_path / "out.bin"
    target.write_bytes(PREVIOUS)

    def write(tmp):
        Path(tmp).write_bytes(b"new" * 10_000)
        raise error

    with pytest.raises(type(error)) as raised:
        atomic_write(target, write)
    assert raised.value is error
    assert target.read_bytes() == PREVIOUS and list(tmp_path.iterdir()) == [target]


def test_the_file_being_written_is_a_temporary_beside_the_destination_until_it_is_published(tmp_path):
    """While the new file is written the destination still holds its previous bytes (a reader sees the old file
    whole); the temporary is NAME.XXXXXXXX.tmp beside it; on a clean exit the destination holds the new bytes and
    the temporary is gone."""
    target = tmp_path / "out.bin"
    target.write_bytes(PREVIOUS)
    with replaced_atomically(target) as tmp:
        tmp = Path(tmp)
        tmp.write_bytes(b"new bytes")
        assert target.read_bytes() == PREVIOUS
        assert tmp.parent == tmp_path and tmp.name.startswith("out.bin.") and tmp.name.endswith(".tmp")
        assert len(tmp.name) == len("out.bin.XXXXXXXX.tmp")
    assert target.read_bytes() == b"new bytes" and list(tmp_path.iterdir()) == [target]


def test_an_hdf5_output_interrupted_after_its_datasets_keeps_the_existing_file(tmp_path):
    """An :class:`H5Output` written through :func:`atomic_write`, interrupted once a dataset is on the disk: the
    interrupt propagates, the destination holds exactly its previous bytes, no temporary is left."""
    import numpy as np

    target = tmp_path / "out.h5"
    target.write_bytes(PREVIOUS)
    written = []

    def write(tmp):
        with H5Output(tmp) as f:
            f.create_dataset("data", data=np.arange(100_000))
            f.flush()
            written.append(Path(tmp).stat().st_size)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert written[0] > 800_000  # the dataset's bytes reached the file being written
    assert target.read_bytes() == PREVIOUS and list(tmp_path.iterdir()) == [target]


class _InterruptedWhenRead(list):
    """A list that interrupts whoever iterates over it (its length and truth are a list's)."""

    def __iter__(self):
        raise KeyboardInterrupt


def test_simulation_results_interrupted_midway_keep_the_existing_file(tmp_path):
    """:func:`write_results_h5` interrupted after the per-step series are written (reading the channels): the
    interrupt propagates, the previous results file holds exactly its bytes, no temporary is left."""
    import attrs

    from tierflow.config import load_scenario
    from tierflow.metrics import write_results_h5
    from tierflow.sim.engine import Simulation

    results = Simulation(load_scenario("hbm_only", ["model=olmoe-1b-7b", "hardware=h100-pcie5", "gpus=1",
                                                    "workload.decode_tokens=2"])).run()
    assert len(results.channels) == 1  # a link: the channels are written after the per-step series
    target = tmp_path / "results.h5"
    target.write_bytes(PREVIOUS)
    with pytest.raises(KeyboardInterrupt):
        write_results_h5(attrs.evolve(results, channels=_InterruptedWhenRead(results.channels)), target)
    assert target.read_bytes() == PREVIOUS and list(tmp_path.iterdir()) == [target]
    write_results_h5(results, target)  # the same results, not interrupted, replace it
    assert target.read_bytes().startswith(b"\x89HDF") and list(tmp_path.iterdir()) == [target]


def test_trace_generation_interrupted_midway_keeps_the_existing_trace(tmp_path):
    """``trace gen``'s writer interrupted once tokens are routed (Ctrl-C in the progress callback): the
    interrupt propagates, the existing trace holds exactly its previous bytes, no temporary is left."""
    from tierflow.trace.synth import generate

    target = tmp_path / "trace.h5"
    target.write_bytes(PREVIOUS)
    routed = []

    def interrupt(tokens):
        routed.append(tokens)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate("olmoe-1b-7b", 20, target, workers=1, progress=interrupt)
    assert routed == [20]
    assert target.read_bytes() == PREVIOUS and list(tmp_path.iterdir()) == [target]
