"""Progress bars on stderr for long runs, shown from the first piece of work done.

click's bar prints its label as soon as it opens when stderr is not a terminal (a log file, a CI job), so a bar
opened before a command has checked its input would put a line ahead of the one-line error bad input gets.
:func:`progress_bar` opens click's bar at the first :meth:`Progress.update` instead: a command that fails
before doing any work prints only its error.
"""

from __future__ import annotations

import sys

import click


class Progress:
    """A click progress bar on stderr, opened lazily; use as a context manager and call :meth:`update`."""

    def __init__(self, length: int, label: str, hidden: bool = False, **options):
        self._arguments = dict(length=max(length, 1), label=label, file=sys.stderr, hidden=hidden, **options)
        self._bar = None

    def __enter__(self) -> Progress:
        return self

    def update(self, done: int) -> None:
        """Count ``done`` more units of work (the first call shows the bar)."""
        if self._bar is None:
            self._bar = click.progressbar(**self._arguments).__enter__()
        self._bar.update(done)

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)


def progress_bar(length: int, label: str, hidden: bool = False, **options) -> Progress:
    """A :class:`Progress` over ``length`` units (``options`` go to ``click.progressbar``)."""
    return Progress(length, label, hidden, **options)
