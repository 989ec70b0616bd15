"""The host DRAM staging buffer on the SSD -> DRAM -> GPU path: a bounded number of bytes.

Without GPUDirect Storage an expert read from SSD lands in pinned host memory before the DMA to the GPU.
A transfer holds its bytes in the buffer from before the SSD read until the GPU copy has finished; when the
buffer is full, new reads wait for space, first come first served. It runs on the data paths'
:class:`~tierflow.sim.calendar.Calendar` and grants space with the timing of a ``simpy.Container``: a
grant takes effect after the requester's own turn, and space released is offered again one turn later.
"""

from __future__ import annotations

from collections import deque


class StagingBuffer:
    def __init__(self, calendar, capacity_bytes: int):
        self.calendar = calendar
        self.capacity_bytes = int(capacity_bytes)
        self.free_bytes = self.capacity_bytes
        self.peak_bytes = 0
        self._waiting: deque = deque()  # (size_bytes, then) in arrival order

    def acquire(self, size_bytes: int, then) -> None:
        """Reserve ``size_bytes``, then call ``then()`` (at the same time, once the caller's turn is over)."""
        self._waiting.append((size_bytes, then))
        self._grant()

    def release(self, size_bytes: int) -> None:
        self.free_bytes += size_bytes
        self.calendar.schedule(0.0, self._grant)

    def _grant(self, _argument=None) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0] <= self.free_bytes:
            size_bytes, then = waiting.popleft()
            self.free_bytes -= size_bytes
            self.calendar.schedule(0.0, self._granted, then)

    def _granted(self, then) -> None:
        self.peak_bytes = max(self.peak_bytes, self.capacity_bytes - self.free_bytes)
        then()
