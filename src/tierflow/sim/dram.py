"""The host DRAM staging buffer on the SSD -> DRAM -> GPU path: a bounded number of bytes.

Without GPUDirect Storage an expert read from SSD lands in pinned host memory before the DMA to the GPU.
A transfer holds its bytes in the buffer from before the SSD read until the GPU copy has finished; when the
buffer is full, new reads wait for space: demand misses first, then prefetches, each first come first served
(a demand miss overtakes waiting prefetches, as in the channels' queues). A prefetch is granted space only
while it leaves ``prefetch_reserve_bytes`` free for the next demand miss, so that prefetches in flight (or
pre-empted on the drive, which keep their space) cannot hold a demand miss out of the buffer. It runs on the
data paths' :class:`~tierflow.sim.calendar.Calendar` and grants space with the timing of a
``simpy.Container``: a grant takes effect after the requester's own turn, and space released is offered again
one turn later.
"""

from __future__ import annotations

from collections import deque

from tierflow.sim.transfer import DEMAND


class StagingBuffer:
    def __init__(self, calendar, capacity_bytes: int, prefetch_reserve_bytes: int = 0):
        self.calendar = calendar
        self.capacity_bytes = int(capacity_bytes)
        self.free_bytes = self.capacity_bytes
        self.prefetch_reserve_bytes = int(prefetch_reserve_bytes)
        self.peak_bytes = 0
        self._waiting = (deque(), deque())  # by priority (demand, prefetch): (size_bytes, then) in arrival order
        self._starting = 0  # granted, their start still to run (a turn of the calendar later)
        self.start_listeners: list = []  # told when a read has left the buffer's wait for the drive

    @property
    def waiting(self) -> int:
        """Transfers waiting for space or granted and not started yet (not in the drive's queue yet)."""
        return len(self._waiting[0]) + len(self._waiting[1]) + self._starting

    def acquire(self, size_bytes: int, then, priority: int = DEMAND) -> None:
        """Reserve ``size_bytes``, then call ``then()`` (at the same time, once the caller's turn is over)."""
        self._waiting[priority].append((size_bytes, then))
        self._grant()

    def promote(self, transfer) -> bool:
        """Move a prefetch waiting for space (``transfer.start`` is its callback) among the waiting demand
        misses, behind those already there; False if it is not waiting."""
        prefetch = self._waiting[1]
        for index, (size_bytes, then) in enumerate(prefetch):
            if getattr(then, "__self__", None) is transfer:
                del prefetch[index]
                self._waiting[0].append((size_bytes, then))
                self._grant()
                return True
        return False

    def release(self, size_bytes: int) -> None:
        self.free_bytes += size_bytes
        self.calendar.schedule(0.0, self._grant)

    def _grant(self, _argument=None) -> None:
        demand, prefetch = self._waiting
        while demand and demand[0][0] <= self.free_bytes:
            self._start(demand.popleft())
        # Prefetches only once no demand waits, and never into the room kept for the next demand miss (unless
        # the buffer cannot hold both: then a prefetch needs it empty, or it would never start).
        while not demand and prefetch:
            size_bytes = prefetch[0][0]
            reserve = min(self.prefetch_reserve_bytes, self.capacity_bytes - size_bytes)
            if size_bytes + reserve > self.free_bytes:
                break
            self._start(prefetch.popleft())

    def _start(self, waiting) -> None:
        size_bytes, then = waiting
        self.free_bytes -= size_bytes
        self._starting += 1
        self.calendar.schedule(0.0, self._granted, then)

    def _granted(self, then) -> None:
        self.peak_bytes = max(self.peak_bytes, self.capacity_bytes - self.free_bytes)
        self._starting -= 1
        then()
        for listener in self.start_listeners:
            listener(self)
