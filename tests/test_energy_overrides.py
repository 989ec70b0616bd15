"""Scenario ``energy.*`` overrides reprice exactly their figure, and the SSD's sustained read rate closed form.

Every catalog profile prices DDR and HBM reads and writes alike, so the energy tests here set reads and writes to
different, unusual figures: a slip that charges a write at the read figure (or an override that lands on the
wrong figure, or is dropped) changes a component by a known amount.
"""

from __future__ import annotations

import attrs
import pytest

from tierflow.catalog import get_profile
from tierflow.catalog.hardware import KiB
from tierflow.config import load_scenario, valid_keys
from tierflow.energy import COMPONENTS
from tierflow.ledger import Route
from tierflow.sim.calendar import Calendar
from tierflow.sim.engine import Simulation
from tierflow.sim.ssd import DEFAULT_REQUEST_BYTES, SsdChannel, sustained_read_bytes_per_s

PJ = 1e-12

# One unusual figure per key, unlike any catalog figure and unlike each other (DDR and HBM reads differ from
# their writes).
OVERRIDES = {
    "energy.hbm_read_pj_per_bit": 1.37,
    "energy.hbm_write_pj_per_bit": 2.91,
    "energy.ddr_read_pj_per_bit": 5.3,
    "energy.ddr_write_pj_per_bit": 17.9,
    "energy.ssd_read_pj_per_bit": 61.7,
    "energy.link_pj_per_bit": 0.83,
    "energy.pj_per_flop": 0.473,
    "energy.gpu_static_w": 123.4,
    "energy.ddr_static_w": 9.81,
    "energy.ssd_static_w": 3.7,
    "energy.l1_pj_per_bit": 0.071,
    "energy.l2_pj_per_bit": 0.557,
}

# A few decode steps of OLMoE at batch 2 (each run takes a fraction of a second).
SHORT = ["model=olmoe-1b-7b", "workload.batch_size=2", "workload.decode_tokens=4", "workload.context_length=256",
         "cache.capacity_experts=40"]

# Shipped scenarios cut down, one per shape of the SSD route into HBM:
# * three_tier: a DDR expert cache in front of the SSD on two H100s; SSD reads fill the DDR cache on their way
#   in (a DDR write and read per bit), DDR hits are read from DDR, and the experts' all-to-all crosses NVLink;
# * staged: a desktop without GPUDirect Storage, so SSD reads bounce through a DDR staging buffer;
# * direct: GPUDirect Storage on two H100s, so SSD reads never touch DDR.
SCENARIOS = {
    "three_tier": ("three_tier", [*SHORT, "hardware=h100-pcie5", "gpus=2", "ddr_cache.capacity_experts=2000"]),
    "staged": ("ssd_offload", [*SHORT, "hardware=desktop-5070ti", "gpus=1"]),
    "direct": ("ssd_offload", [*SHORT, "hardware=h100-pcie5", "gpus=2"]),
}


def test_every_energy_key_the_scenario_accepts_is_overridden_here():
    """The parametrization below covers exactly the ``energy.*`` keys a scenario accepts: a new key fails here
    until it is given a figure and a closed form."""
    assert sorted(OVERRIDES) == sorted(k for k in valid_keys() if k.startswith("energy."))


def _figures(hw, overrides: dict) -> dict:
    """The figures the run should price with: the profile's, each replaced by its override when given."""
    given = {key.removeprefix("energy."): value for key, value in overrides.items()}
    hbm, ddr, ssd = hw.gpu.hbm, hw.ddr, hw.ssd
    catalog = {
        "hbm_read_pj_per_bit": hbm.read_pj_per_bit, "hbm_write_pj_per_bit": hbm.write_pj_per_bit,
        "ddr_read_pj_per_bit": ddr.read_pj_per_bit, "ddr_write_pj_per_bit": ddr.write_pj_per_bit,
        "ssd_read_pj_per_bit": ssd.read_pj_per_bit,
        "pj_per_flop": hw.gpu.pj_per_flop,
        "gpu_static_w": hw.gpu.static_power_w + hbm.static_power_w,
        "ddr_static_w": ddr.static_power_w, "ssd_static_w": ssd.static_power_w,
        "l1_pj_per_bit": hw.gpu.l1_pj_per_bit or 0.0, "l2_pj_per_bit": hw.gpu.l2_pj_per_bit or 0.0,
    }
    figures = {name: given.get(name, value) for name, value in catalog.items()}
    # energy.link_pj_per_bit reprices both offload links (drive to host, host to GPU), never NVLink.
    figures["host_link"] = given.get("link_pj_per_bit", hw.host_link.pj_per_bit)
    figures["ssd_link"] = given.get("link_pj_per_bit", hw.ssd_link.pj_per_bit)
    return figures


def _expected_routes(shape: str, hw) -> dict:
    """The ledger's routes into HBM for each scenario shape, spelled out (the drive's link, then the host's)."""
    ssd_links = (hw.ssd_link.name, hw.host_link.name)
    if shape == "direct":
        return {"ssd->hbm": Route("ssd", "hbm", ssd_links)}
    routes = {"ssd->hbm": Route("ssd", "hbm", ssd_links, "ddr")}
    if shape == "three_tier":
        routes["ddr->hbm"] = Route("ddr", "hbm", (hw.host_link.name,))
    return routes


@pytest.mark.parametrize("overridden", ["none", *OVERRIDES, "all"])
@pytest.mark.parametrize("shape", sorted(SCENARIOS))
def test_energy_override_reprices_exactly_its_closed_form(shape, overridden):
    """Each component of ``energy_j_per_token`` x tokens equals its closed form from the run's own ledger, with
    the profile's figures and the override(s) in place of theirs:
    ``ssd`` = SSD bits x SSD read; ``ddr`` = SSD bits x (DDR write + DDR read) when staged or filling the DDR
    cache + DDR-hit bits x DDR read; ``hbm`` = all copied bits x HBM write + compute's HBM-read bits x HBM read;
    ``link`` = SSD bits x (drive link + host link) + DDR-hit bits x host link + collective bits x NVLink (never
    overridden); ``compute`` = FLOPs x pJ/FLOP + L1 bits x L1 + HBM-read bits x L2; ``static`` = GPUs x
    (GPU + DDR + SSD W) x simulated seconds. ``total`` is their sum, and ``static_w`` reports the watts."""
    name, sets = SCENARIOS[shape]
    overrides = {"none": {}, "all": OVERRIDES}.get(overridden, {overridden: OVERRIDES.get(overridden)})
    sim = Simulation(load_scenario(name, [*sets, *(f"{key}={value!r}" for key, value in overrides.items())]))
    results = sim.run()
    hw, ledger, gpus = sim.hardware, sim.ledger, sim.plan.gpus
    assert gpus == (1 if shape == "staged" else 2)
    assert hw.gpudirect_storage == (shape != "staged")
    f = _figures(hw, overrides)

    routes = _expected_routes(shape, hw)
    assert ledger.bytes_by_route().keys() == set(routes.values())
    moved = results.summary["bytes_moved"]
    assert moved.keys() == routes.keys() and all(size > 0 for size in moved.values())
    ssd_bits, ddr_bits = 8 * moved["ssd->hbm"], 8 * moved.get("ddr->hbm", 0)
    staged = shape != "direct"
    collectives = dict(ledger.collective_bytes)
    # Two GPUs exchange the experts' tokens over NVLink: its catalog figure stays whatever link_pj_per_bit says.
    assert (set(collectives) == {hw.nvlink.name}) if gpus > 1 else not collectives
    assert ledger.flops > 0 and ledger.hbm_read_bytes > 0 and ledger.l1_bytes > 0

    elapsed = float(results.step_latency_s.sum())
    watts = {"gpu": gpus * f["gpu_static_w"], "ddr": gpus * f["ddr_static_w"], "ssd": gpus * f["ssd_static_w"]}
    expected = {
        "ssd": ssd_bits * f["ssd_read_pj_per_bit"] * PJ,
        "ddr": (ssd_bits * (f["ddr_write_pj_per_bit"] + f["ddr_read_pj_per_bit"]) * staged
                + ddr_bits * f["ddr_read_pj_per_bit"]) * PJ,
        "hbm": ((ssd_bits + ddr_bits) * f["hbm_write_pj_per_bit"]
                + 8 * ledger.hbm_read_bytes * f["hbm_read_pj_per_bit"]) * PJ,
        "link": (ssd_bits * (f["ssd_link"] + f["host_link"]) + ddr_bits * f["host_link"]
                 + sum(8 * size * hw.nvlink.pj_per_bit for size in collectives.values())) * PJ,
        "compute": (ledger.flops * f["pj_per_flop"]
                    + 8 * (ledger.l1_bytes * f["l1_pj_per_bit"] + ledger.hbm_read_bytes * f["l2_pj_per_bit"])) * PJ,
        "static": sum(watts.values()) * elapsed,
    }
    expected["total"] = sum(expected[component] for component in COMPONENTS)
    tokens = results.summary["tokens"]
    assert tokens == 2 * 4
    joules = {component: per_token * tokens for component, per_token in results.summary["energy_j_per_token"].items()}
    assert joules == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert results.static_w == pytest.approx(watts, rel=1e-15, abs=0.0)


def test_l1_and_l2_overrides_price_their_own_bytes_at_a_batch_that_tells_them_apart():
    """At batch 2 a weight byte crosses L1 once, as it crosses L2, so L1 and L2 bytes are equal; at batch 64 it
    crosses L1 once per 16-token tile: the compute component is FLOPs x pJ/FLOP + L1 bits x L1 + L2 bits x L2
    with the L1 bits now larger, so a mix-up of the two byte counts changes it."""
    name, sets = SCENARIOS["direct"]
    sim = Simulation(load_scenario(name, [*sets, "workload.batch_size=64", "cache.capacity_experts=",
                                          "energy.l1_pj_per_bit=0.071", "energy.l2_pj_per_bit=0.557"]))
    results = sim.run()
    ledger = sim.ledger
    assert ledger.l1_bytes > 1.1 * ledger.hbm_read_bytes  # weights cross L1 more often; the KV cache once
    expected = (ledger.flops * sim.hardware.gpu.pj_per_flop
                + 8 * (ledger.l1_bytes * 0.071 + ledger.hbm_read_bytes * 0.557)) * PJ
    compute = results.summary["energy_j_per_token"]["compute"] * results.summary["tokens"]
    assert compute == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_ddr_overrides_tell_the_staging_bounce_apart_from_the_ddr_hits():
    """Without GPUDirect Storage the staging bounce costs a DDR write and a DDR read per SSD bit: moving 1 pJ/bit
    from the DDR read figure to the write figure leaves the ``ddr`` component of a staged run unchanged, while in
    three tiers it moves the DDR hits' bits x 1 pJ (they are read from DDR, never written there on the way)."""
    def ddr_joules(shape, read, write):
        name, sets = SCENARIOS[shape]
        sim = Simulation(load_scenario(name, [*sets, f"energy.ddr_read_pj_per_bit={read}",
                                              f"energy.ddr_write_pj_per_bit={write}"]))
        results = sim.run()
        return results.summary["energy_j_per_token"]["ddr"] * results.summary["tokens"], results

    staged_a, _ = ddr_joules("staged", 6.0, 11.0)
    staged_b, _ = ddr_joules("staged", 5.0, 12.0)
    assert staged_a == pytest.approx(staged_b, rel=1e-12, abs=0.0)
    tier_a, results = ddr_joules("three_tier", 6.0, 11.0)
    tier_b, _ = ddr_joules("three_tier", 5.0, 12.0)
    hit_bits = 8 * results.summary["bytes_moved"]["ddr->hbm"]
    assert tier_a - tier_b == pytest.approx(hit_bits * 1.0 * PJ, rel=1e-9, abs=0.0)


# ------------------------------------------------------------------------------------------ SSD sustained rate
# The rate is min(bandwidth, IOPS x request bytes, concurrent x request bytes / (latency + request / bandwidth),
# the drive's link), concurrent = min(queue_depth, internal_parallelism). Catalog drives are bandwidth-bound;
# each test below makes one other term bind and checks it is strictly below every other term.

CATALOG_SSD = get_profile("h100-pcie5").ssd


def _terms(drive, link=None) -> dict:
    """Each term of the closed form for ``drive``, by name (a term the drive leaves unset is absent)."""
    request = drive.request_bytes or DEFAULT_REQUEST_BYTES
    bandwidth = drive.read_bandwidth_bytes_per_s
    concurrent = min(drive.queue_depth or 1, drive.internal_parallelism or 1)
    terms = {"bandwidth": bandwidth}
    if drive.read_iops:
        terms["iops"] = drive.read_iops * request
    if drive.read_latency_s > 0:
        terms["concurrency"] = concurrent * request / (drive.read_latency_s + request / bandwidth)
    if link is not None:
        terms["link"] = link.bandwidth_bytes_per_s
    return terms


def _assert_binds(drive, term: str, expected: float, link=None) -> None:
    """``term`` equals ``expected``, lies strictly below every other term, and is the drive's rate (the function
    and the channel the simulator builds from it)."""
    terms = _terms(drive, link)
    assert terms[term] == pytest.approx(expected, rel=1e-15)
    assert all(expected < value for name, value in terms.items() if name != term), terms
    assert sustained_read_bytes_per_s(drive, link) == pytest.approx(expected, rel=1e-15)
    channel = SsdChannel(Calendar(), drive, link, 4 * 2**20)
    assert channel.bandwidth_bytes_per_s == pytest.approx(expected, rel=1e-15)


def test_catalog_drive_is_bandwidth_bound():
    """The catalog PCIe 5 drive: 13 GB/s sequential binds (IOPS x 128 KiB = 328 GB/s, 175 x 128 KiB / 80 us =
    286 GB/s)."""
    _assert_binds(CATALOG_SSD, "bandwidth", 13e9)


def test_iops_binds_at_the_drives_request_size():
    """50,000 IOPS at 128 KiB requests: the rate is exactly 50,000 x 131,072 B/s (6.55 GB/s), under the drive's
    13 GB/s; with 64 KiB requests it halves (the request size, not 4 KiB or the default, scales the term)."""
    drive = attrs.evolve(CATALOG_SSD, read_iops=50_000)
    _assert_binds(drive, "iops", 50_000 * 128 * KiB)
    smaller = attrs.evolve(drive, request_bytes=64 * KiB)
    _assert_binds(smaller, "iops", 50_000 * 64 * KiB)


def test_iops_term_uses_the_default_request_size_when_the_drive_gives_none():
    """A drive with no request size is read in :data:`DEFAULT_REQUEST_BYTES` (128 KiB) requests."""
    assert DEFAULT_REQUEST_BYTES == 128 * KiB
    drive = attrs.evolve(CATALOG_SSD, read_iops=30_000, request_bytes=None)
    _assert_binds(drive, "iops", 30_000 * 128 * KiB)


def test_internal_parallelism_binds_below_the_queue_depth():
    """Queue depth 256 but 4 requests served at once: 4 x 128 KiB / (70 us + 128 KiB / 13 GB/s) = 6.55 GB/s."""
    drive = attrs.evolve(CATALOG_SSD, internal_parallelism=4)
    assert drive.queue_depth == 256
    request = 128 * KiB
    _assert_binds(drive, "concurrency", 4 * request / (70e-6 + request / 13e9))


def test_queue_depth_binds_below_the_internal_parallelism():
    """Queue depth 3 on a drive that could serve 175 at once: 3 x 128 KiB / (70 us + 128 KiB / 13 GB/s)."""
    drive = attrs.evolve(CATALOG_SSD, queue_depth=3)
    assert drive.internal_parallelism == 175
    request = 128 * KiB
    _assert_binds(drive, "concurrency", 3 * request / (70e-6 + request / 13e9))


@pytest.mark.parametrize(("queue_depth", "parallelism"), [(None, None), (None, 175), (256, None)])
def test_an_unset_queue_depth_or_parallelism_means_one_request_at_a_time(queue_depth, parallelism):
    """Either left unset counts as 1: one request at a time, each its latency plus its transfer: 128 KiB / (70 us +
    128 KiB / 13 GB/s) = 1.64 GB/s, whatever the other is."""
    drive = attrs.evolve(CATALOG_SSD, queue_depth=queue_depth, internal_parallelism=parallelism)
    request = 128 * KiB
    _assert_binds(drive, "concurrency", request / (70e-6 + request / 13e9))


def test_the_drives_link_binds_below_the_drive():
    """A drive behind a link of 2.5 GB/s delivers exactly the link's rate."""
    link = attrs.evolve(get_profile("h100-pcie5").ssd_link, bandwidth_bytes_per_s=2.5e9)
    _assert_binds(CATALOG_SSD, "link", 2.5e9, link)


def test_without_latency_or_iops_the_bandwidth_binds_whatever_the_concurrency():
    """No latency, no IOPS rating, one request at a time: no concurrency or IOPS term, the bandwidth is the rate."""
    drive = attrs.evolve(CATALOG_SSD, read_latency_s=0.0, read_iops=None, queue_depth=1, internal_parallelism=1)
    assert _terms(drive).keys() == {"bandwidth"}
    _assert_binds(drive, "bandwidth", 13e9)
