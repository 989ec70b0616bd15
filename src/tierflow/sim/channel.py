"""A channel serves transfers one at a time, demand before prefetch, FIFO within each.

It runs on the data paths' :class:`~tierflow.sim.calendar.Calendar`: starting a transfer schedules one
event at the end of its service, which delivers it and starts the next; an idle channel costs nothing.

Links, SSDs and other data paths are channels; each owns its own delay (:meth:`Channel.service_time`). A
transfer that arrives from an upstream hop may have been streaming into this channel while the upstream
hop was still reading (cut-through in chunks of ``chunk_bytes``): if this channel sat idle during that
time, the bytes it could have carried then are credited, so a pipelined copy costs about the slower hop's
time plus one chunk on the faster one, not the sum of both.
"""

from __future__ import annotations

import heapq
import itertools
import math

from tierflow.sim.transfer import DEMAND, PREFETCH


class Channel:
    """Serves :class:`~tierflow.sim.transfer.Transfer` objects; subclasses define the service time."""

    kind = "link"  # what results call it: "link" or "ssd"
    # Whether a transfer that starts the moment the previous one ends has its latency hidden by the time it
    # waited: a drive keeps its request queue full, so a queued read's requests are already under way (see
    # :mod:`tierflow.sim.ssd`).
    hides_latency_when_busy = False

    def __init__(self, calendar, name: str, bandwidth_bytes_per_s: float, latency_s: float, chunk_bytes: int):
        if bandwidth_bytes_per_s <= 0:
            raise ValueError(f"{name}: bandwidth must be > 0")
        self.calendar, self.name = calendar, name
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.latency_s = latency_s
        self.chunk_bytes = chunk_bytes
        self.busy_s = 0.0
        self.bytes_carried = 0
        self._queue: list = []
        self._order = itertools.count()
        self._busy = False
        self._idle_since = 0.0
        self._serving = None  # (transfer, duration, first chunk time, start, latency paid, bytes credited) while busy
        self._serial = 0  # counts services started: an end event of an earlier one is stale
        self._yield_chunks = None  # while the prefetch in service is to stop: its chunks carried by then
        self.preemptive = False
        self.preemptions = 0
        self._times_by_size: dict[int, tuple[float, float]] = {}
        self.dequeue_listeners: list = []  # told (with the channel) when a queued transfer starts: the queue shrank

    def submit(self, transfer) -> None:
        transfer.queued_at = self.calendar.now
        if self._busy:
            heapq.heappush(self._queue, (transfer.priority, next(self._order), transfer))
            if self.preemptive and transfer.priority == DEMAND and self._serving[0].priority == PREFETCH:
                self._preempt()
        else:  # an idle channel has an empty queue
            self._start(transfer, False)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def promote(self, transfer) -> None:
        """``transfer`` (now at demand priority) is queued here or in service: a queued one moves among the
        queued demand transfers (by its order of arrival; one pre-empted earlier keeps its place at the head) and,
        like a demand arriving, may pre-empt the prefetch in service; one in service is no longer pre-empted."""
        for index, (priority, order, queued) in enumerate(self._queue):
            if queued is transfer:
                if priority != transfer.priority:
                    self._queue[index] = (transfer.priority, order, transfer)
                    heapq.heapify(self._queue)
                    if self.preemptive and self._serving[0].priority == PREFETCH:
                        self._preempt()
                return

    def transfer_time(self, size_bytes: int) -> float:
        """Seconds to carry ``size_bytes`` on an idle channel, latency included."""
        return self.latency_s + size_bytes / self.bandwidth_bytes_per_s

    def _times(self, size_bytes: int) -> tuple[float, float]:
        """(whole transfer, first chunk) times for a size, kept in ``_times_by_size``: transfers come in a few
        sizes, so :meth:`service_time` finds them there."""
        times = self._times_by_size[size_bytes] = (self.transfer_time(size_bytes),
                                                   self.transfer_time(min(self.chunk_bytes, size_bytes)))
        return times

    def service_time(self, transfer) -> tuple[float, float, float]:
        """(time busy with ``transfer`` if it starts now, time until its first chunk is through: 0 for a
        transfer resuming after a preemption, whose first chunk went through before; the time taken off for
        the bytes credited as carried while upstream was still reading, 0 without credit)."""
        if transfer.hop_bytes != transfer.size_bytes:  # resuming after a preemption: the rest, no overlap credit
            return self.transfer_time(transfer.hop_bytes), 0.0, 0.0
        full, first_chunk = self._times_by_size.get(transfer.size_bytes) or self._times(transfer.size_bytes)
        upstream_done_at = transfer.upstream_done_at
        if upstream_done_at is None:
            return full, first_chunk, 0.0
        # Bytes this channel could have moved while upstream was still producing them, had it been idle.
        overlap = upstream_done_at - max(self._idle_since, transfer.data_ready_at)
        if overlap <= 0:
            return full, first_chunk, 0.0
        duration = max(first_chunk, full - overlap)
        return duration, first_chunk, full - duration

    def _start(self, transfer, back_to_back: bool) -> None:
        """Serve ``transfer`` from now; ``back_to_back``: the channel was busy until now (it comes off the queue).
        On a channel that hides latency when busy, the time it waited in the queue (at most the latency) is
        taken off: its requests were already in flight."""
        self._busy = True
        now = self.calendar.now
        if transfer.on_start is not None:
            transfer.on_start(transfer)
            transfer.on_start = None
        duration, first_chunk_s, credit_s = self.service_time(transfer)
        latency = self.latency_s
        if back_to_back and self.hides_latency_when_busy:
            hidden = min(latency, now - transfer.queued_at)
            duration, first_chunk_s, latency = duration - hidden, max(first_chunk_s - hidden, 0.0), latency - hidden
        first_chunk_at = now + first_chunk_s if transfer.hop_bytes == transfer.size_bytes else transfer.first_chunk_at
        # Bytes credited as carried before the service began (cut-through): a pre-emption keeps them carried.
        self._serving = transfer, duration, first_chunk_at, now, latency, credit_s * self.bandwidth_bytes_per_s
        self._serial += 1
        self._yield_chunks = None
        self.calendar.schedule(duration, self._finish, self._serial)

    def _finish(self, serial) -> None:
        if serial != self._serial:  # the service was preempted and this end is void
            return
        transfer, duration, first_chunk_at, _, _, _ = self._serving
        now = self.calendar.now
        self.busy_s += duration
        self.bytes_carried += transfer.hop_bytes
        self._idle_since = now
        dequeued = bool(self._queue)
        if dequeued:
            self._start(heapq.heappop(self._queue)[2], True)
        else:
            self._busy = False
        transfer.hop_finished(now, first_chunk_at)
        if dequeued:
            for listener in self.dequeue_listeners:
                listener(self)

    def _preempt(self) -> None:
        """A demand transfer waits behind the prefetch in service: end that service at its next chunk boundary
        (at once if its bytes have not begun to flow: it is still in its latency), unless it is in its last
        chunk (or already stopping). Chunks flow evenly over the service after its latency; the bytes credited
        as carried while upstream was still reading (cut-through) count as carried from its start."""
        if self._yield_chunks is not None:
            return
        transfer, duration, _, started, latency, credited = self._serving
        chunks = math.ceil(transfer.hop_bytes / self.chunk_bytes)
        streaming = duration - latency
        now = self.calendar.now
        if not credited:
            # Whole chunks flow at the channel's rate (streaming / hop_bytes per byte); only the last may be short.
            per_chunk = streaming * self.chunk_bytes / transfer.hop_bytes
            done = max(0, math.ceil((now - started - latency) / per_chunk))  # chunks under way or finished
            if done >= chunks:
                return
            at = started + latency + per_chunk * done if done else now
        else:  # the service streams at the channel's bandwidth after its latency, on top of the credited bytes
            flowing = now - started - latency
            if flowing <= 0:  # nothing flows yet: stop at once, keeping the whole chunks credited
                done, at = math.floor(credited / self.chunk_bytes + 1e-9), now
            else:
                carried = credited + flowing * self.bandwidth_bytes_per_s
                done = math.ceil(carried / self.chunk_bytes - 1e-9)  # chunks under way or finished
                at = now + (done * self.chunk_bytes - carried) / self.bandwidth_bytes_per_s
            if done >= chunks:
                return
        self._yield_chunks = done
        self.calendar.schedule(at - now, self._yield, self._serial)

    def _yield(self, serial) -> None:
        """The prefetch in service stops at a chunk boundary: it keeps its place at the head of the prefetch queue
        with the bytes it has left (all of them if it had only just started), and the waiting demand starts."""
        if serial != self._serial:
            return
        if self._serving[0].priority == DEMAND:  # promoted since the pre-emption was decided: it carries on
            self._yield_chunks = None
            return
        transfer, _, first_chunk_at, started, *_ = self._serving
        now = self.calendar.now
        moved = self._yield_chunks * self.chunk_bytes
        self.busy_s += now - started
        self.bytes_carried += moved
        self.preemptions += 1
        self._idle_since = now  # busy until now: what comes next gets no cut-through credit for that time
        transfer.hop_bytes -= moved
        transfer.first_chunk_at = first_chunk_at
        heapq.heappush(self._queue, (transfer.priority, -next(self._order), transfer))  # ahead of later prefetches
        self._start(heapq.heappop(self._queue)[2], back_to_back=moved > 0)
