"""The calendar the data paths run on: hop completions and buffer grants, in time order, off SimPy's queue.

Channels, transfers and staging buffers change nothing the GPU stream can see until it next looks (a cache
lookup, a prefetch decision, the end of a wait), and the GPU stream is the only process that hands them
work. So their events wait here and run when the stream catches up (:meth:`Calendar.advance`), and a layer
that waits for its experts yields one SimPy timeout to the moment the last one lands (:meth:`Calendar.
run_until`) instead of one event per hop. Events at the same time run in the order they were created, as on
SimPy's queue, and the stream's own wake-ups take a place in that order (:meth:`Calendar.mark`), so the
outcome is the one SimPy would give with every hop on its own queue.
"""

from __future__ import annotations

import heapq
import itertools
import math


class Calendar:
    """A time-ordered queue of ``(time, order, action, argument)``; ``now`` is the time of the last event run."""

    def __init__(self):
        self.now = 0.0
        self.events_run = 0
        self._heap: list = []
        self._order = itertools.count()

    def schedule(self, delay: float, action, argument=None) -> None:
        """Call ``action(argument)`` ``delay`` seconds from now (after the events already due then)."""
        heapq.heappush(self._heap, (self.now + delay, next(self._order), action, argument))

    def mark(self, when: float) -> tuple[float, int]:
        """A place in the order at time ``when``: events created before it run first, later ones after."""
        return when, next(self._order)

    def advance(self, mark: tuple[float, int]) -> None:
        """Run every event ordered before ``mark``; the clock then reads the mark's time."""
        heap, pop = self._heap, heapq.heappop
        # An event (time, order, ...) is before the mark (time, order) as tuples: no two share an order.
        while heap and heap[0] < mark:
            self.now, _, action, argument = pop(heap)
            self.events_run += 1
            action(argument)
        self.now = mark[0]

    def run_until(self, arrival) -> tuple[float, int]:
        """Run events until ``arrival`` (an :class:`~tierflow.sim.transfer.Arrival`) is complete; returns its
        mark, the place in the order where its waiter wakes."""
        heap, pop = self._heap, heapq.heappop
        while arrival.pending:
            if not heap:
                raise RuntimeError(f"{arrival.pending} awaited transfer(s) can never arrive: nothing is scheduled")
            self.now, _, action, argument = pop(heap)
            self.events_run += 1
            action(argument)
        return arrival.mark

    def run(self, until: float = math.inf) -> None:
        """Run the events due before ``until`` (every event by default), like ``simpy.Environment.run``."""
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] < until:
            self.now, _, action, argument = pop(heap)
            self.events_run += 1
            action(argument)
        if until != math.inf:
            self.now = until


def timeout_towards(env, when: float):
    """A SimPy timeout that ends at ``when`` (a calendar time) exactly if ``env.now + delay`` can land there;
    it always can once ``now >= when / 2`` (the difference is then exact). Before that it rarely cannot, and
    the timeout ends at three quarters of ``when``: the caller waits again until ``env.now == when``."""
    now = env.now
    delay = when - now
    if now + delay != when:
        delay = 0.75 * when - now
    return env.timeout(delay)
