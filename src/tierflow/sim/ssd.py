"""An NVMe SSD as a channel: an expert read is split into requests kept ``queue_depth`` deep.

An expert of ``B`` bytes becomes ``ceil(B / request_bytes)`` read requests. The drive serves at most
``min(queue_depth, internal_parallelism)`` of them at once, each taking ``read_latency`` before its data
streams out at the drive's bandwidth, and the whole drive delivers at most its sequential bandwidth and
completes at most its rated IOPS (a bound on commands per second; rated on 4 KiB reads, it does not bind for
128 KiB requests on the drives in the catalog). So its sustained rate is ``min(bandwidth, IOPS * request_bytes,
concurrent * request_bytes / (latency + request_bytes / bandwidth))``: at queue depth 1 one request at a time,
each its latency plus its transfer. A read that finds the
drive idle costs one request latency (the pipeline fills) plus its bytes at that rate; a read queued behind
another has its requests in the drive while it waits (the host keeps the queue full), so the time it waited,
up to the whole latency, is taken off: a drive kept busy pays the latency once per busy period, and a read
that arrives just before the drive frees up pays nearly all of it. The drive's own link (e.g. PCIe Gen5 x4)
caps the rate too. Reads queue in the drive's submission queue, demand before prefetch.

A demand read pre-empts a prefetch at its next 4 MiB chunk boundary (:meth:`Channel._preempt`). A drive cannot
recall commands it has accepted, so this assumes the host submits a prefetch's requests a few at a time (about
one bandwidth-delay product, 13 GB/s x 70 us = 0.9 MB on a PCIe 5 drive, under one chunk) rather than all at
once: with a whole 44 MB expert's requests in the drive, a demand read would wait for all of them.
"""

from __future__ import annotations

from tierflow.catalog.hardware import KiB, Link, MemoryTier
from tierflow.sim.channel import Channel

# A drive whose profile gives no request size: the catalog's own assumption for every drive (see _REQUEST in
# catalog/hardware.py: 128 KiB, the common Linux max_sectors_kb split of a large read).
DEFAULT_REQUEST_BYTES = 128 * KiB


def sustained_read_bytes_per_s(ssd: MemoryTier, link: Link | None = None) -> float:
    """The drive's sustained read rate for expert-sized reads (see the module docstring)."""
    request = ssd.request_bytes or DEFAULT_REQUEST_BYTES
    concurrent = min(ssd.queue_depth or 1, ssd.internal_parallelism or 1)
    rates = [ssd.read_bandwidth_bytes_per_s]
    if ssd.read_iops:
        rates.append(ssd.read_iops * request)
    if ssd.read_latency_s > 0:
        rates.append(concurrent * request / (ssd.read_latency_s + request / ssd.read_bandwidth_bytes_per_s))
    if link is not None:
        rates.append(link.bandwidth_bytes_per_s)
    return min(rates)


class SsdChannel(Channel):
    """An NVMe drive serving expert reads from its submission queue."""

    kind = "ssd"
    hides_latency_when_busy = True

    def __init__(self, calendar, ssd: MemoryTier, link: Link | None, chunk_bytes: int, name: str | None = None):
        super().__init__(calendar, name or ssd.name, sustained_read_bytes_per_s(ssd, link), ssd.read_latency_s,
                         chunk_bytes)
        self.ssd = ssd
