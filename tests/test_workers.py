"""Worker processes: a dying worker costs only its own call, leaving early stops the workers at once, and a
sweep's workers never outlive it (SIGTERM, SIGINT or SIGKILL to the parent alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tierflow.workers import WorkerDied, run_parallel

# Processes are found through Linux's /proc (/proc/PID/task/TID/children).


def _call(item):
    kind, value = item
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise ValueError(value)
    if kind == "sleep":
        time.sleep(value)
    return value * 10


def test_a_dying_worker_costs_only_its_own_call():
    items = [("ok", 1), ("ok", 2), ("die", 0), ("ok", 3), ("raise", "bad"), ("sleep", 0.2), ("ok", 4)]
    outcomes = {index: (result, error) for index, result, error in run_parallel(_call, items, 2)}
    assert sorted(outcomes) == list(range(len(items)))
    assert {i: r for i, (r, e) in outcomes.items() if e is None} == {0: 10, 1: 20, 3: 30, 5: 2.0, 6: 40}
    assert isinstance(outcomes[2][1], WorkerDied)
    assert isinstance(outcomes[4][1], ValueError) and str(outcomes[4][1]) == "bad"


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(child) for child in text)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_leaving_early_terminates_the_workers_at_once():
    calls = run_parallel(_call, [("ok", 1), ("sleep", 60), ("sleep", 60)], 3)
    assert next(calls) == (0, 10, None)
    workers = _children(os.getpid())
    assert workers
    start = time.monotonic()
    calls.close()
    assert time.monotonic() - start < 10
    assert not any(_alive(pid) for pid in workers)


SLOW_SWEEP = """
name = "slow"
scenario = "ssd_offload"
seed = 1
[set]
"workload.decode_tokens" = 2000
[grid]
"cache.capacity_experts" = [1856, 1900, 1950, 2000]
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_sweeps_workers_end_with_it(tmp_path, signum, status):
    sweep_file = tmp_path / "slow.toml"
    sweep_file.write_text(textwrap.dedent(SLOW_SWEEP))
    # SIGINT as in a terminal: a shell's background job (a test run started with `&`) inherits it ignored, and
    # Python then leaves it ignored, as it should.
    command = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "from tierflow.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", command, "sweep", sweep_file, "--out", tmp_path / "out",
                                "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while len(workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        workers = _children(process.pid)
    assert len(workers) == 2, process.communicate()
    time.sleep(1.0)  # the workers are simulating
    start = time.monotonic()
    process.send_signal(signum)  # to the parent alone, as `kill PID` does
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    while any(_alive(pid) for pid in workers) and time.monotonic() - start < 10:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    assert time.monotonic() - start < 10  # not after the points in progress (each takes far longer)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def _die_later(item):
    kind, value = item
    if kind == "die":
        time.sleep(value)
        os.kill(os.getpid(), signal.SIGKILL)
    return _call(item)


def test_a_worker_dying_between_two_results_costs_only_its_call():
    # The worker of item 1 dies while the caller is busy with item 0's result: the next submit finds the pool
    # broken, and the calls go on in a new one.
    calls = run_parallel(_die_later, [("ok", 0), ("die", 0.3), ("ok", 2), ("ok", 3)], 2)
    outcomes = {}
    for index, result, error in calls:
        outcomes[index] = (result, error)
        time.sleep(1.0)
    assert {i: r for i, (r, e) in outcomes.items() if e is None} == {0: 0, 2: 20, 3: 30}
    assert isinstance(outcomes[1][1], WorkerDied)


def _raise_trace_error(item):
    from tierflow.errors import TraceError

    raise TraceError("/x/trace.h5", "cut short")


def test_an_error_a_call_raises_reaches_the_caller_as_itself():
    from tierflow.errors import TraceError

    (index, result, error), = run_parallel(_raise_trace_error, [1], 2)
    assert isinstance(error, TraceError) and (error.path, error.problem) == ("/x/trace.h5", "cut short")
