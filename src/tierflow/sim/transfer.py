"""A transfer: one expert's bytes moving from a lower tier toward a destination tier, hop by hop."""

from __future__ import annotations

DEMAND, PREFETCH = 0, 1  # queue priorities: a demand miss overtakes queued prefetches


class Transfer:
    """One expert moving ``size_bytes`` from ``src`` to ``dst`` through ``hops`` (channels, in order).

    ``priority`` is the queue priority, ``prefetched`` whether a prefetch started it (a prefetch a layer then
    waits for is promoted to demand priority but stays prefetched bytes in the ledger).
    ``waiters`` are :class:`Arrival` barriers told when the last hop delivers. ``data_ready_at`` is when the
    first chunk of data is available to the current hop (for cut-through between hops). ``via`` names a
    tier the bytes bounce through (the DDR staging buffer on the SSD path without GPUDirect Storage).
    """

    __slots__ = (
        "key", "size_bytes", "src", "dst", "via", "priority", "hops", "hop", "waiters", "issued_at",
        "arrived_at", "data_ready_at", "upstream_done_at", "on_done", "gpu", "staged_bytes", "hop_bytes",
        "first_chunk_at", "queued_at", "prefetched", "on_start", "target_step",
    )

    def __init__(self, calendar, key, size_bytes, src, dst, hops, priority, gpu=0, via=None, on_done=None):
        self.key, self.size_bytes, self.src, self.dst, self.via = key, size_bytes, src, dst, via
        self.priority, self.hops, self.hop, self.gpu = priority, hops, 0, gpu
        self.prefetched = priority == PREFETCH
        self.waiters = []
        self.issued_at = self.data_ready_at = calendar.now
        self.arrived_at = None
        self.upstream_done_at = None
        self.on_done = on_done
        self.staged_bytes = 0
        self.hop_bytes = size_bytes  # left to carry on the current hop (less after a preemption)
        self.first_chunk_at = None  # on a preempted hop: when its first chunk went through
        self.queued_at = None  # when it was submitted to the current hop
        self.on_start = None  # called (with the transfer) once, when its first hop begins to serve it
        self.target_step = None  # a prefetch: the decode step it was proposed for

    def start(self) -> None:
        self.hops[0].submit(self)

    def hop_finished(self, now: float, first_chunk_at: float) -> None:
        """Called by the channel that just delivered this transfer's bytes."""
        self.hop += 1
        self.hop_bytes, self.first_chunk_at = self.size_bytes, None
        if self.hop < len(self.hops):
            self.data_ready_at = first_chunk_at
            self.upstream_done_at = now
            self.hops[self.hop].submit(self)
            return
        self.arrived_at = now
        if self.on_done is not None:
            self.on_done(self)
        for waiter in self.waiters:
            waiter.one_arrived()


class Arrival:
    """A barrier over transfers: complete when every given transfer has arrived. A layer waits on this (one
    wake-up at :attr:`mark`, see :meth:`Calendar.run_until`) instead of on one event per transfer."""

    __slots__ = ("calendar", "pending", "mark")

    def __init__(self, calendar, transfers):
        self.calendar = calendar
        self.pending = 0
        self.mark = None
        for transfer in transfers:
            if transfer.arrived_at is None:
                transfer.waiters.append(self)
                self.pending += 1
        if not self.pending:
            self.mark = calendar.mark(calendar.now)

    def one_arrived(self) -> None:
        self.pending -= 1
        if not self.pending:
            self.mark = self.calendar.mark(self.calendar.now)
