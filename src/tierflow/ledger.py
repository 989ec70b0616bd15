"""The ledger: every byte moved, every FLOP computed and every byte compute reads from HBM, recorded once.

Energy is derived from the ledger (:mod:`tierflow.energy`), never inside the simulator.
"""

from __future__ import annotations

from collections import defaultdict

import attrs


@attrs.frozen(cache_hash=True)  # a key of the ledger's tables, looked up for every transfer
class Route:
    """Where bytes went: source tier, destination tier, the links crossed, and a tier they bounced through."""

    src: str
    dst: str
    links: tuple[str, ...]
    via: str | None = None

    @property
    def label(self) -> str:
        return f"{self.src}->{self.dst}"


class Ledger:
    def __init__(self):
        self.demand_bytes: dict[Route, int] = defaultdict(int)
        self.prefetch_bytes: dict[Route, int] = defaultdict(int)
        self.flops = 0.0
        self.hbm_read_bytes = 0.0  # weights and KV cache read by compute (each crosses L2 once)
        self.l1_bytes = 0.0  # on-chip L1 traffic of compute
        self.collective_bytes: dict[str, float] = defaultdict(float)  # link name -> bytes all-reduces etc. send

    def record_transfer(self, route: Route, size_bytes: int, prefetch: bool) -> None:
        (self.prefetch_bytes if prefetch else self.demand_bytes)[route] += size_bytes

    def record_compute(self, flops: float, hbm_read_bytes: float, l1_bytes: float = 0.0,
                       collective_bytes: tuple = ()) -> None:
        self.flops += flops
        self.hbm_read_bytes += hbm_read_bytes
        self.l1_bytes += l1_bytes
        for link, size in collective_bytes:
            self.collective_bytes[link] += size

    def bytes_by_route(self) -> dict[Route, int]:
        total: dict[Route, int] = defaultdict(int)
        for table in (self.demand_bytes, self.prefetch_bytes):
            for route, size in table.items():
                total[route] += size
        return dict(total)

    def bytes_moved(self) -> dict[str, int]:
        """Bytes per "src->dst", demand and prefetch together."""
        moved: dict[str, int] = defaultdict(int)
        for route, size in self.bytes_by_route().items():
            moved[route.label] += size
        return dict(sorted(moved.items()))
