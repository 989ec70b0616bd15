"""Links (PCIe, NVLink-C2C, NVLink) as channels with the catalog's usable bandwidth and per-transfer latency."""

from __future__ import annotations

from tierflow.catalog.hardware import Link
from tierflow.sim.channel import Channel


class LinkChannel(Channel):
    """A link: ``latency + bytes / bandwidth`` per transfer; concurrent transfers queue and share it in turn."""

    def __init__(self, calendar, link: Link, chunk_bytes: int, name: str | None = None,
                 bandwidth_bytes_per_s: float | None = None):
        super().__init__(calendar, name or link.name, bandwidth_bytes_per_s or link.bandwidth_bytes_per_s,
                         link.latency_s, chunk_bytes)
        self.link = link
