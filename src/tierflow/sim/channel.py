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


class Channel:
    """Serves :class:`~tierflow.sim.transfer.Transfer` objects; subclasses define the service time."""

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
        self._serving = None  # (transfer, duration, first chunk time) while busy
        self._times_by_size: dict[int, tuple[float, float]] = {}
        self.dequeue_listeners: list = []  # told (with the channel) when a queued transfer starts: the queue shrank

    def submit(self, transfer) -> None:
        if self._busy:
            heapq.heappush(self._queue, (transfer.priority, next(self._order), transfer))
        else:  # an idle channel has an empty queue
            self._start(transfer)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def transfer_time(self, size_bytes: int) -> float:
        """Seconds to carry ``size_bytes`` on an idle channel, latency included."""
        return self.latency_s + size_bytes / self.bandwidth_bytes_per_s

    def _times(self, size_bytes: int) -> tuple[float, float]:
        """(whole transfer, first chunk) times for a size; transfers come in a few sizes, so they are kept."""
        times = self._times_by_size.get(size_bytes)
        if times is None:
            times = self.transfer_time(size_bytes), self.transfer_time(min(self.chunk_bytes, size_bytes))
            self._times_by_size[size_bytes] = times
        return times

    def service_time(self, transfer, now: float) -> float:
        """How long this channel is busy with ``transfer`` if it starts now."""
        full, last_chunk = self._times(transfer.size_bytes)
        if transfer.upstream_done_at is None:
            return full
        # Bytes this channel could have moved while upstream was still producing them, had it been idle.
        overlap = transfer.upstream_done_at - max(self._idle_since, transfer.data_ready_at)
        if overlap <= 0:
            return full
        return max(last_chunk, full - overlap)

    def _start(self, transfer) -> None:
        self._busy = True
        now = self.calendar.now
        duration = self.service_time(transfer, now)
        first_chunk_s = self._times(transfer.size_bytes)[1]
        self._serving = transfer, duration, now + (first_chunk_s if first_chunk_s < duration else duration)
        self.calendar.schedule(duration, self._finish)

    def _finish(self, _argument) -> None:
        transfer, duration, first_chunk_at = self._serving
        now = self.calendar.now
        self.busy_s += duration
        self.bytes_carried += transfer.size_bytes
        self._idle_since = now
        dequeued = bool(self._queue)
        if dequeued:
            self._start(heapq.heappop(self._queue)[2])
        else:
            self._busy = False
        transfer.hop_finished(now, first_chunk_at)
        if dequeued:
            for listener in self.dequeue_listeners:
                listener(self)
