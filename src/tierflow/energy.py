"""Energy from the ledger: pure functions of recorded bytes, FLOPs and time.

* A transfer's bits cost the read energy at the source tier, the energy of each link crossed, the write
  energy at the destination tier and, when they bounce through a staging tier, that tier's write and read.
* Compute costs FLOPs x pJ/FLOP plus its on-chip traffic (every byte read from HBM crosses L2 once; the L1
  traffic is the ledger's) at the L1 and L2 pJ/bit; the bytes compute reads from HBM cost the HBM read
  energy (component ``hbm``).
* The bytes compute's collectives (all-reduces, the experts' all-to-all) send between GPUs cost each link's
  pJ/bit (component ``link``).
* Static energy is each device's background power x simulated time.

Components: ``compute`` (arithmetic), ``hbm`` (compute's HBM reads and writes into HBM), ``ddr``, ``ssd``,
``link`` and ``static``; ``total`` is their sum.
"""

from __future__ import annotations

import attrs

from tierflow.ledger import Ledger, Route

PJ = 1e-12
COMPONENTS = ("compute", "hbm", "ddr", "ssd", "link", "static")


@attrs.frozen
class EnergyModel:
    """Per-bit, per-FLOP and static figures (from the hardware profile, with scenario overrides)."""

    read_pj_per_bit: dict[str, float]  # tier -> pJ/bit
    write_pj_per_bit: dict[str, float]
    link_pj_per_bit: dict[str, float]  # link name -> pJ/bit
    pj_per_flop: float
    static_w: dict[str, float]  # component -> W (all devices of the deployment)
    l1_pj_per_bit: float = 0.0
    l2_pj_per_bit: float = 0.0


def route_energy_j(model: EnergyModel, route: Route, size_bytes: float) -> dict[str, float]:
    """Joules per component for moving ``size_bytes`` along ``route``."""
    bits = 8.0 * size_bytes
    parts = dict.fromkeys(COMPONENTS, 0.0)
    parts[route.src] += bits * model.read_pj_per_bit[route.src] * PJ
    parts[route.dst] += bits * model.write_pj_per_bit[route.dst] * PJ
    if route.via is not None:
        parts[route.via] += bits * (model.write_pj_per_bit[route.via] + model.read_pj_per_bit[route.via]) * PJ
    parts["link"] += sum(bits * model.link_pj_per_bit[link] * PJ for link in route.links)
    return parts


def ledger_energy_j(model: EnergyModel, ledger: Ledger, elapsed_s: float) -> dict[str, float]:
    """Joules per component and ``total`` for everything in the ledger over ``elapsed_s`` seconds."""
    parts = dict.fromkeys(COMPONENTS, 0.0)
    for route, size in ledger.bytes_by_route().items():
        for name, joules in route_energy_j(model, route, size).items():
            parts[name] += joules
    parts["compute"] += ledger.flops * model.pj_per_flop * PJ
    parts["compute"] += 8.0 * (ledger.l1_bytes * model.l1_pj_per_bit + ledger.hbm_read_bytes * model.l2_pj_per_bit) * PJ
    parts["hbm"] += 8.0 * ledger.hbm_read_bytes * model.read_pj_per_bit["hbm"] * PJ
    parts["link"] += sum(8.0 * size * model.link_pj_per_bit[link] * PJ for link, size in ledger.collective_bytes.items())
    parts["static"] += sum(model.static_w.values()) * elapsed_s
    parts["total"] = sum(parts[name] for name in COMPONENTS)
    return parts
