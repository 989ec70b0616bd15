"""The host DRAM staging buffer on the SSD -> DRAM -> GPU path: a bounded number of bytes.

Without GPUDirect Storage an expert read from SSD lands in pinned host memory before the DMA to the GPU.
A transfer holds its bytes in the buffer from before the SSD read until the GPU copy has finished; when the
buffer is full, new reads wait for space (SimPy ``Container``).
"""

from __future__ import annotations

import simpy


class StagingBuffer:
    def __init__(self, env, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self._space = simpy.Container(env, capacity=self.capacity_bytes, init=self.capacity_bytes)
        self.peak_bytes = 0

    def fits(self, size_bytes: int) -> bool:
        return size_bytes <= self.capacity_bytes

    def acquire(self, size_bytes: int):
        """Event that succeeds when ``size_bytes`` are reserved."""
        return self._space.get(size_bytes)

    def release(self, size_bytes: int) -> None:
        self._space.put(size_bytes)

    def note_usage(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.capacity_bytes - self._space.level)
