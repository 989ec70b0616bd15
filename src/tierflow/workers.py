"""Worker processes for long runs (trace generation, sweeps, the paper's cells), stopped cleanly however the run
ends.

* While the parent forks workers, SIGINT and SIGTERM are held (:func:`signals_held`): a signal whose handler
  raises during a fork is lost (Python ignores an exception raised in its at-fork callbacks), leaving a
  half-started pool to wait on forever; held, it is delivered once the workers exist.
* A worker ignores SIGINT (the parent stops it: Ctrl-C in a terminal reaches the whole process group, and a
  traceback per worker would bury the one-line message), ends on SIGTERM, and ends when its parent dies, even
  by SIGKILL (:func:`worker_started`).
* SIGTERM unwinds the parent like Ctrl-C does (:func:`sigterm_unwinds`), so temporary files are removed and
  workers stopped; the exit status is 143.
* :func:`run_parallel` runs calls on a process pool. Leaving it early (an error, a signal, the caller
  stopping) terminates the workers at once instead of waiting for the calls in progress; a worker that dies
  (killed, out of memory) costs only the call it was running (:class:`WorkerDied`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM until the block ends (see the module's docstring)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def sigterm_unwinds():
    """While the block runs, SIGTERM raises ``SystemExit(143)`` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: clean-up code runs (the default action would kill the process and leave temporary files
    and workers behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigint_ignored():
    """While the block runs, SIGINT is ignored; processes started meanwhile inherit that (and Python installs its
    KeyboardInterrupt handler only where SIGINT is not ignored), so they leave Ctrl-C to this process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def die_with_parent() -> None:
    """End this process when its parent does: PR_SET_PDEATHSIG on Linux, else a thread watching the parent id."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_started(initializer: Callable | None = None, *initargs) -> None:
    """A pool's initializer: the signal set-up of the module's docstring, then ``initializer(*initargs)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a clean-up handler inherited from a forking parent
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # held by the parent while it forked
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def new_pool(workers: int, initializer: Callable | None = None, initargs: tuple = (),
             mp_context=None) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool whose workers run :func:`worker_started` (submit under :func:`signals_held`: the pool
    forks its workers at submits). On Linux the workers are forked from this process, whatever Python's
    default: a forkserver's workers would watch the forkserver, which outlives a killed parent, for its death."""
    if mp_context is None and sys.platform.startswith("linux"):
        mp_context = multiprocessing.get_context("fork")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp_context, initializer=worker_started,
                                                  initargs=(initializer, *initargs))


def terminate_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop ``pool``'s workers now, whatever they are doing, and shut the pool down (signals held meanwhile: a
    second Ctrl-C must not cut the clean-up short)."""
    with signals_held():
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 5.0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # stuck before its SIGTERM handler was in place
                process.kill()
                process.join()
        # A worker stopped while sending a result leaves half a message in the result pipe, and the pool's
        # manager thread would wait for the rest forever (shutdown, and the interpreter's exit, join it). With
        # every worker gone, closing this process's copy of the pipe's write end lets it read end-of-file
        # instead, take the pool as broken and end.
        writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
        if writer is not None:
            writer.close()
        pool.shutdown(cancel_futures=True)


class WorkerDied(RuntimeError):
    """The worker process running a call died (killed by a signal, or out of memory) while the call ran alone."""

    def __init__(self):
        super().__init__("its worker process died (killed, or out of memory) while running it alone")


def run_parallel(function: Callable, items: Sequence, workers: int) -> Iterator[tuple[int, Any, BaseException | None]]:
    """``(index, result, None)`` or ``(index, None, error)`` for each of ``items`` as ``function(item)``
    finishes on one of ``workers`` processes, in order of completion.

    At most ``workers`` calls are in the pool at once, so a worker that dies takes down only the calls
    running then. Those run again one at a time, in a new pool: a call that kills its worker again, alone, is
    reported as :class:`WorkerDied` and the others go on. An exception raised by ``function`` is reported as
    the error. Leaving the iteration early terminates the workers at once.
    """
    queue: deque[int] = deque(range(len(items)))
    suspects: deque[int] = deque()  # running when a worker died: they run again alone
    running: dict[concurrent.futures.Future, tuple[int, bool]] = {}  # -> (index, running alone)
    pool = None
    try:
        while queue or suspects or running:
            if pool is None:
                pool = new_pool(workers)
            limit = 1 if suspects else workers
            broken = False
            while len(running) < limit and (suspects or queue):
                source = suspects if suspects else queue
                index = source.popleft()
                try:
                    with signals_held():
                        running[pool.submit(function, items[index])] = (index, limit == 1)
                except BrokenProcessPool:  # a worker died since the last wait: this call never started
                    source.appendleft(index)
                    broken = True
                    break
            done = (concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)[0]
                    if running else set())
            for future in done:
                index, alone = running.pop(future)
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    broken = True
                    if alone:
                        yield index, None, WorkerDied()
                    else:
                        suspects.append(index)
                    continue
                yield index, (None if error else future.result()), error
            if broken:  # every call still in the pool failed with it, bar those that had just finished
                for future, (index, _) in list(running.items()):
                    if future.done() and future.exception() is None:
                        yield index, future.result(), None
                    else:
                        suspects.append(index)
                running.clear()
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            if running:
                terminate_pool(pool)
            else:
                pool.shutdown(wait=True)
