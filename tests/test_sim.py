"""The simulator: closed forms, conservation, energy accounting, determinism and bad scenarios."""

from __future__ import annotations

import json
import math
import re

import attrs
import h5py
import numpy as np
import pytest
import simpy

from conftest import scenario_with, assert_one_line_error, run_cli
from tierflow.cache import Access, TierCache, make_expert_cache, make_policy
from tierflow.catalog import get_model, get_profile
from tierflow.catalog.hardware import _revised
from tierflow.config import load_scenario
from tierflow import metrics
from tierflow.energy import COMPONENTS
from tierflow.errors import TierflowError
from tierflow.sim.calendar import Calendar, timeout_towards
from tierflow.sim.channel import Channel
from tierflow.sim.dram import StagingBuffer
from tierflow.ledger import Ledger, Route
from tierflow.sim.engine import Simulation
from tierflow.sim.gpu import ComputeModel
from tierflow.sim.memory import ExpertMemory, FetchPath
from tierflow.sim.ssd import SsdChannel, sustained_read_bytes_per_s
from tierflow.sim.transfer import DEMAND, PREFETCH, Arrival, Transfer
from tierflow.trace.format import write_trace

SMALL = {
    "name": "small",
    "model": "olmoe-1b-7b",
    "hardware": "h100-pcie5",
    "placement": "ddr",
    "workload": {"batch_size": 2, "decode_tokens": 12, "context_length": 256},
}


def small(**changes):
    return scenario_with(SMALL, **changes)


def run(scenario):
    sim = Simulation(scenario)
    return sim, sim.run()


# ------------------------------------------------------------------------------------------ closed forms


def test_without_cache_each_step_is_compute_plus_serialised_transfers():
    """One link, no prefetch, no reuse: every layer waits for its n experts one after another."""
    sim, results = run(small(**{"cache.enabled": False}))
    spec, link = sim.spec, sim.hardware.host_link
    transfer_s = link.latency_s + spec.expert_bytes / link.bandwidth_bytes_per_s
    compute = sim.compute
    decoded: dict[int, int] = {}  # steps each sequence decoded so far: its KV cache beyond context_length
    for step, latency in zip(sim.workload.steps, results.step_latency_s, strict=True):
        ids = step.sequence_ids.tolist()
        context = tuple(SMALL["workload"]["context_length"] + decoded.get(i, 0) for i in ids)
        decoded.update((i, decoded.get(i, 0) + 1) for i in ids)
        expected = compute.dense_prefix(context).seconds + compute.lm_head().seconds
        for layer, experts in enumerate(step.experts):
            expected += compute.attention(context, layer).seconds
            expected += len(experts) * transfer_s
            expected += compute.experts(experts.tolist(), step.tokens_per_expert[layer].tolist()).seconds
        assert latency == pytest.approx(expected, rel=1e-9)


def test_with_a_cache_misses_match_an_independent_replay_and_bytes_follow():
    sim, results = run(small(**{"cache.capacity_experts": 100}))
    cache = TierCache(make_policy("lru"), 100, "shadow")
    misses = 0
    for step in sim.workload.steps:
        for layer, experts in enumerate(step.experts):
            for expert in experts.tolist():
                key = layer * sim.workload.num_experts + expert
                if not cache.lookup(key, Access(key, 0)):
                    misses += 1
                    cache.admit(key, 1, Access(key, 0))
    assert int(results.step_misses.sum()) == misses
    assert results.summary["bytes_moved"] == {"ddr->hbm": misses * sim.spec.expert_bytes}
    requests = sum(len(e) for step in sim.workload.steps for e in step.experts)
    assert results.summary["hit_rate"]["hbm"] == pytest.approx(1 - misses / requests)


def test_layer_lookups_add_up_and_match_the_caches_hit_rate():
    sim, results = run(small(**{"cache.capacity_experts": 100, "prefetch.policy": "previous_token"}))
    layers = results.layers
    requests = [sum(len(step.experts[layer]) for step in sim.workload.steps) for layer in range(sim.workload.num_layers)]
    np.testing.assert_array_equal(layers["hits"] + layers["in_flight"] + layers["misses"], requests)
    assert layers["hits"].sum() == results.step_hits.sum() and layers["misses"].sum() == results.step_misses.sum()
    assert layers["in_flight"].sum() > 0  # prefetches still on their way when their layer looked
    assert layers["in_flight"].sum() == results.step_in_flight.sum() == results.summary["prefetch"]["late"]
    step_lookups = results.step_hits + results.step_in_flight + results.step_misses
    np.testing.assert_array_equal(step_lookups, [sum(map(len, step.experts)) for step in sim.workload.steps])
    rates = metrics.layer_hit_rates(layers)
    assert float(np.average(rates, weights=requests)) == pytest.approx(results.summary["hit_rate"]["hbm"])
    low = int(np.argmin(rates))
    assert f"hit rate by layer lowest {100 * rates[low]:.1f}% (MoE layer {low})" in metrics.format_table(
        results.summary, results)


def test_channel_busy_time_is_latency_plus_bytes_over_bandwidth():
    """Without a cache or prefetching every SSD read is a whole expert at the drive's sustained rate (a drive has
    no upstream hop to overlap with), and each layer's reads queue at once on an idle drive, which pays its
    latency once for them: busy time = reads x expert bytes / rate + (steps x layers) x latency."""
    sim, results = run(small(**{"placement": "ssd", "cache.enabled": False}))
    expert, ssd = sim.spec.expert_bytes, sim.hardware.ssd
    busy_periods = len(sim.workload.steps) * sim.workload.num_layers
    rate = sustained_read_bytes_per_s(ssd, sim.hardware.ssd_link)
    drives = [c for c in results.channels if c["name"].startswith(ssd.name)]
    links = [c for c in results.channels if c["name"].startswith(sim.hardware.host_link.name)]
    assert len(drives) == len(links) == sim.plan.gpus
    assert sum(c["bytes"] for c in drives) == sum(c["bytes"] for c in links) == results.summary["bytes_moved"]["ssd->hbm"]
    for drive in drives:
        reads = drive["bytes"] // expert
        assert reads > busy_periods
        assert drive["busy_s"] == pytest.approx(reads * expert / rate + busy_periods * ssd.read_latency_s, rel=1e-9)
        assert 0 < drive["busy_share"] <= 1 and drive["preemptions"] == 0
    horizon = drives[0]["busy_s"] / drives[0]["busy_share"]
    for channel in drives + links:  # bandwidth used: bytes at the channel's rate over the run
        rate_of = rate if channel in drives else sim.hardware.host_link.bandwidth_bytes_per_s
        assert channel["utilization"] == pytest.approx(channel["bytes"] / rate_of / horizon, rel=1e-9)
    assert links[0]["busy_share"] < links[0]["utilization"]  # the link overlaps the drive's reads
    text = metrics.format_table(results.summary, results)
    assert "utilization" in text and f"{ssd.name} " in text
    assert "hit rate          HBM n/a" in text and "hit rate by layer" not in text  # no cache: no layer rates
    moved, tokens = results.summary["bytes_moved"]["ssd->hbm"], results.summary["tokens"]
    assert f"ssd->hbm {moved / tokens / 1e9:.2f} GB/token ({moved / 1e9:.2f} GB in all)" in text


def test_stall_is_the_wait_beyond_compute():
    sim, results = run(small(**{"cache.enabled": False}))
    link = sim.hardware.host_link
    transfer_s = link.latency_s + sim.spec.expert_bytes / link.bandwidth_bytes_per_s
    for step, stall in zip(sim.workload.steps, results.step_stall_s, strict=True):
        assert stall == pytest.approx(sum(len(e) for e in step.experts) * transfer_s, rel=1e-9)


def test_ssd_sustained_rate_is_the_tightest_of_its_limits():
    profile = get_profile("h100-pcie5")
    ssd, link = profile.ssd, profile.ssd_link
    # The PM1743 at queue depth 256 streams at its rated 13 GB/s, under its Gen5 x4 link's rate.
    assert sustained_read_bytes_per_s(ssd, link) == ssd.read_bandwidth_bytes_per_s < link.bandwidth_bytes_per_s
    slow_link = _revised(link, bandwidth_bytes_per_s=(1e9, "[DER] test"))
    assert sustained_read_bytes_per_s(ssd, slow_link) == 1e9


@pytest.mark.parametrize("depth", [1, 4])
def test_a_shallow_queue_reads_a_few_requests_at_a_time_each_latency_plus_transfer(depth):
    """At queue depth d an expert's n requests go d at a time, each its latency and then its bytes at the
    drive's bandwidth: an isolated read on the drive's channel takes about ceil(n / d) x (latency + request
    bytes / bandwidth), plus the one latency the channel charges a read that finds the drive idle."""
    ssd = _revised(get_profile("h100-pcie5").ssd, queue_depth=(depth, "[DER] test"))
    size = get_model("deepseek-r1").expert_bytes
    requests = -(-size // ssd.request_bytes)
    per_request = ssd.read_latency_s + ssd.request_bytes / ssd.read_bandwidth_bytes_per_s
    calendar = Calendar()
    drive = SsdChannel(calendar, ssd, None, 4 * 2**20)
    transfer = Transfer(calendar, 0, size, "ssd", "hbm", [drive], DEMAND)
    drive.submit(transfer)
    calendar.run()
    # The channel streams the bytes at the rate d requests in flight sustain (a fraction of a request at the end
    # costs its fraction), after the idle drive's one latency: exact.
    expected = size / (depth * ssd.request_bytes) * per_request + ssd.read_latency_s
    assert transfer.arrived_at == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(requests / depth * per_request + ssd.read_latency_s, rel=1 / requests)


def _channel_pair(calendar, bw1, bw2, chunk):
    first = Channel(calendar, "a", bw1, 1e-6, chunk)
    second = Channel(calendar, "b", bw2, 2e-6, chunk)
    return first, second


def test_a_drive_pays_its_latency_once_per_busy_period():
    """Reads queued behind another stream at the drive's rate (their requests are already under way); a read
    that finds the drive idle pays the latency again. A link pays its latency for every transfer."""
    calendar = Calendar()
    profile = get_profile("h100-pcie5")
    drive = SsdChannel(calendar, profile.ssd, profile.ssd_link, 1 << 20)
    link = Channel(calendar, "link", drive.bandwidth_bytes_per_s, drive.latency_s, 1 << 20)
    size, latency = 10_000_000, drive.latency_s
    stream = size / drive.bandwidth_bytes_per_s
    for channel, per_queued in ((drive, stream), (link, latency + stream)):
        start = calendar.now
        reads = [Transfer(calendar, key, size, "ssd", "hbm", [channel], DEMAND) for key in range(3)]
        for read in reads:
            read.start()
        calendar.run()
        arrived = [read.arrived_at - start for read in reads]
        assert arrived == pytest.approx([latency + stream + i * per_queued for i in range(3)], rel=1e-12)
        assert channel.busy_s == pytest.approx(arrived[-1], rel=1e-12)
    gap = calendar.now + 1e-3
    calendar.run(until=gap)
    late = Transfer(calendar, 9, size, "ssd", "hbm", [drive], DEMAND)
    late.start()
    calendar.run()
    assert late.arrived_at - gap == pytest.approx(latency + stream, rel=1e-12)
    # A read that queues just before the drive frees up has waited only a little: it pays the rest of the latency,
    # so it never lands sooner than on an idle drive.
    first = Transfer(calendar, 10, size, "ssd", "hbm", [drive], DEMAND)
    first.start()
    start = calendar.now
    calendar.run(until=start + latency + stream - 1e-6)
    just_before = Transfer(calendar, 11, size, "ssd", "hbm", [drive], DEMAND)
    just_before.start()
    calendar.run()
    assert just_before.arrived_at - (start + latency + stream) == pytest.approx(latency - 1e-6 + stream, rel=1e-9)


def test_cut_through_costs_the_slow_hop_plus_one_chunk_on_the_fast_one():
    calendar = Calendar()
    slow, fast = _channel_pair(calendar, 1e9, 4e9, 1_000_000)
    transfer = Transfer(calendar, 1, 10_000_000, "ssd", "hbm", [slow, fast], DEMAND)
    transfer.start()
    calendar.run()
    expected = (1e-6 + 10_000_000 / 1e9) + (2e-6 + 1_000_000 / 4e9)
    assert transfer.arrived_at == pytest.approx(expected)


def test_cut_through_is_bounded_by_the_slow_downstream_hop():
    calendar = Calendar()
    fast, slow = _channel_pair(calendar, 4e9, 1e9, 1_000_000)
    transfer = Transfer(calendar, 1, 10_000_000, "ssd", "hbm", [fast, slow], DEMAND)
    transfer.start()
    calendar.run()
    first_chunk = 1e-6 + 1_000_000 / 4e9
    # The slow hop starts once the first chunk is there and then runs at its own pace.
    assert transfer.arrived_at == pytest.approx(first_chunk + 2e-6 + 10_000_000 / 1e9, rel=1e-6)


def test_a_demand_transfer_overtakes_queued_prefetches():
    calendar = Calendar()
    channel = Channel(calendar, "link", 1e9, 0.0, 1 << 20)
    order = []
    transfers = [Transfer(calendar, key, 1_000_000, "ddr", "hbm", [channel], priority, on_done=order.append)
                 for key, priority in [(0, PREFETCH), (1, PREFETCH), (2, PREFETCH), (3, DEMAND)]]
    transfers[0].start()
    calendar.run(until=1e-6)  # the first prefetch is now in service
    for t in transfers[1:]:
        t.start()
    calendar.run()
    # Service is not pre-empted; the demand goes next, before the prefetches queued ahead of it.
    assert [t.key for t in order] == [0, 3, 1, 2]


def test_a_prefetch_promoted_while_a_pre_emption_is_pending_carries_on():
    """A demand arrives while a prefetch is in service (its yield is scheduled for the next chunk boundary); a
    layer then waits for that very prefetch and promotes it: it finishes without yielding, then the demand."""
    calendar = Calendar()
    channel = _preemptive_link(calendar, latency=0.0)
    prefetch = Transfer(calendar, 0, 10_000_000, "ddr", "hbm", [channel], PREFETCH)
    demand = Transfer(calendar, 1, 1_000_000, "ddr", "hbm", [channel], DEMAND)
    prefetch.start()
    calendar.run(until=2.5e-3)
    demand.start()
    prefetch.priority = DEMAND
    channel.promote(prefetch)
    calendar.run()
    assert prefetch.arrived_at == pytest.approx(10e-3) and demand.arrived_at == pytest.approx(11e-3)
    assert channel.preemptions == 0 and channel.busy_s == pytest.approx(11e-3)


class _RecordingHop:
    """A first hop that records the keys of the transfers reaching it (what a staging buffer let through)."""

    def __init__(self):
        self.started = []

    def submit(self, transfer):
        self.started.append(transfer.key)


def test_a_prefetch_a_layer_waits_for_is_promoted_to_demand():
    """Prefetches 0 (in service), 1 and 2 (queued): a layer starts waiting for 2. It goes next, ahead of 1,
    taking the link over from 0 at its next chunk; it then no longer yields to demand misses, and it stays
    prefetched bytes."""
    calendar = Calendar()
    channel = _preemptive_link(calendar, latency=0.0)
    order = []
    transfers = [Transfer(calendar, key, 10_000_000, "ddr", "hbm", [channel], PREFETCH, on_done=order.append)
                 for key in range(3)]
    for t in transfers:
        t.start()
    calendar.run(until=2.5e-3)
    transfers[2].priority = DEMAND
    channel.promote(transfers[2])
    calendar.run(until=5.5e-3)
    Transfer(calendar, 3, 1_000_000, "ddr", "hbm", [channel], DEMAND, on_done=order.append).start()
    calendar.run()
    assert [t.key for t in order] == [2, 3, 0, 1]
    assert transfers[2].arrived_at == pytest.approx(3e-3 + 10e-3)  # from prefetch 0's third chunk boundary
    assert channel.preemptions == 1 and all(t.prefetched for t in transfers)
    # A promoted read waiting for staging space joins the waiting demand misses.
    buffer = StagingBuffer(calendar, 10, prefetch_reserve_bytes=0)
    drive = _RecordingHop()
    started = drive.started
    waiting = [Transfer(calendar, key, 6, "ssd", "hbm", [drive], priority) for key, priority in
               ((0, DEMAND), (1, PREFETCH), (2, PREFETCH))]
    for t in waiting:
        buffer.acquire(6, t.start, t.priority)
    calendar.run()
    assert buffer.promote(waiting[2]) and not buffer.promote(waiting[0])
    buffer.release(6)
    calendar.run()
    assert started == [0, 2]


def test_staging_takes_a_promoted_read_behind_the_waiting_demands_and_prefetches_after_every_demand():
    """A 10-byte buffer: demand 0 holds 6; demand 1 (6) and prefetches 3 (2), 2 (6) wait. Prefetch 3 and the
    2 bytes it must leave for the next demand fit in the 4 free, but a demand waits: prefetches start only once
    none does. Promoting 2 puts it behind demand 1, ahead of demand 4 that comes later."""
    calendar = Calendar()
    buffer = StagingBuffer(calendar, 10, prefetch_reserve_bytes=2)
    drive = _RecordingHop()
    started = drive.started
    transfers = {key: Transfer(calendar, key, size, "ssd", "hbm", [drive], priority) for key, size, priority in
                 ((0, 6, DEMAND), (1, 6, DEMAND), (2, 6, PREFETCH), (3, 2, PREFETCH), (4, 6, DEMAND))}
    for key in (0, 1, 3, 2):
        buffer.acquire(transfers[key].size_bytes, transfers[key].start, transfers[key].priority)
    calendar.run()
    assert started == [0]
    assert buffer.promote(transfers[2])
    buffer.acquire(6, transfers[4].start, DEMAND)
    for expected in ([0, 1], [0, 1, 2], [0, 1, 2, 4, 3]):  # the last demand leaves 4 free: prefetch 3 fits
        buffer.release(6)
        calendar.run()
        assert started == expected


def test_a_layer_waiting_for_a_prefetch_held_in_staging_moves_it_among_the_demand_misses():
    """One GPU's memory with a two-expert staging buffer on its SSD path: demand misses 0 and 1 fill it, prefetch
    2 waits for space, then demand miss 3. A layer needs 2 (a late prefetch): it is promoted in the buffer, so it
    reads before demand miss 4, which comes after, and lands ahead of it."""
    size = 1_000_000
    calendar = Calendar()
    drive, link = _channel_pair(calendar, 1e9, 4e9, size)
    staging = StagingBuffer(calendar, 2 * size)
    paths = {"ssd": FetchPath([drive, link], Route("ssd", "hbm", ("a", "b"), "ddr"), staging)}
    hbm = make_expert_cache("lru", "global", 8, num_layers=2, num_experts=4, expert_bytes=size)
    memory = ExpertMemory(calendar, 0, hbm, None, paths, "ssd", size, Ledger(), num_layers=2)
    arrivals = {}
    for key in (0, 1):
        arrivals[key] = memory.demand(key, Access(key, key, layer=0))
    memory.prefetch_now(2, Access(2, 2, layer=1, prefetch=True))
    arrivals[2] = memory.in_flight[2]
    arrivals[3] = memory.demand(3, Access(3, 3, layer=0))
    calendar.run(until=1e-4)
    assert memory.demand(2, Access(2, 4, layer=1)) is arrivals[2]  # in flight: the layer waits for it
    arrivals[4] = memory.demand(4, Access(4, 5, layer=1))
    calendar.run()
    assert sorted(arrivals, key=lambda key: arrivals[key].arrived_at) == [0, 1, 3, 2, 4]
    assert memory.prefetch.late == 1 and memory.prefetch.useful == 1


def _preemptive_link(calendar, latency=1e-6):
    channel = Channel(calendar, "link", 1e9, latency, 1_000_000)
    channel.preemptive = True
    return channel


def _demand_during_prefetch(prefetch_bytes: int, demand_bytes: int, demand_at: float, latency: float = 1e-6):
    """A prefetch from t=0 on a pre-emptive 1 GB/s link in 1 MB chunks, a demand submitted at ``demand_at``;
    both run to the end. Returns the channel and the two transfers."""
    calendar = Calendar()
    channel = _preemptive_link(calendar, latency)
    prefetch = Transfer(calendar, 0, prefetch_bytes, "ddr", "hbm", [channel], PREFETCH)
    demand = Transfer(calendar, 1, demand_bytes, "ddr", "hbm", [channel], DEMAND)
    prefetch.start()
    calendar.run(until=demand_at)
    demand.start()
    calendar.run()
    return channel, prefetch, demand


def test_a_demand_transfer_takes_over_from_a_prefetch_at_its_next_chunk():
    """10 MB prefetch in 1 MB chunks from t=0; a 2 MB demand arrives 2.5 ms in. The prefetch stops after its
    third chunk, the demand runs, then the prefetch's last 7 MB (one latency again)."""
    latency = 1e-6
    channel, prefetch, demand = _demand_during_prefetch(10_000_000, 2_000_000, 2.5e-3, latency)
    boundary = latency + 3e-3  # chunks flow at 1 ms each once the latency is over
    assert demand.arrived_at == pytest.approx(boundary + latency + 2e-3)
    assert prefetch.arrived_at == pytest.approx(demand.arrived_at + latency + 7e-3)
    assert channel.preemptions == 1
    assert channel.bytes_carried == 12_000_000
    assert channel.busy_s == pytest.approx(prefetch.arrived_at)  # never idle, and no time counted twice


def test_a_pre_empted_prefetch_of_a_size_that_is_not_whole_chunks_keeps_the_channel_s_rate():
    """4.2 MB in 1 MB chunks (the last one short) and a demand 0.1 ms in: the prefetch stops after its first
    whole chunk, at 1 ms (not at 4.2 / 5 ms), so the channel never beats its bandwidth and the two transfers end
    when their bytes at 1 GB/s and three latencies say."""
    latency = 1e-6
    channel, prefetch, demand = _demand_during_prefetch(4_200_000, 1000, 1e-4, latency)
    assert demand.arrived_at == pytest.approx(latency + 1e-3 + latency + 1e-6)
    assert prefetch.arrived_at == pytest.approx(demand.arrived_at + latency + 3.2e-3)
    assert channel.busy_s == pytest.approx(prefetch.arrived_at)
    assert channel.bytes_carried == 4_201_000


def test_a_prefetch_still_in_its_latency_yields_at_once_and_resumes_whole():
    """On a drive, a demand that arrives before the prefetch's bytes flow takes over at once and pays the
    latency itself; the prefetch then streams all its bytes right behind it, its requests already queued."""
    calendar = Calendar()
    profile = get_profile("h100-pcie5")
    drive = SsdChannel(calendar, profile.ssd, profile.ssd_link, 1 << 20)
    drive.preemptive = True
    rate, latency = drive.bandwidth_bytes_per_s, drive.latency_s
    prefetch = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", [drive], PREFETCH)
    demand = Transfer(calendar, 1, 2_000_000, "ssd", "hbm", [drive], DEMAND)
    prefetch.start()
    calendar.run(until=latency / 2)
    demand.start()
    calendar.run()
    assert demand.arrived_at == pytest.approx(latency / 2 + latency + 2_000_000 / rate, rel=1e-12)
    assert prefetch.arrived_at == pytest.approx(demand.arrived_at + 10_000_000 / rate, rel=1e-12)
    assert drive.preemptions == 1 and drive.bytes_carried == 12_000_000
    assert drive.busy_s == pytest.approx(prefetch.arrived_at, rel=1e-12)


def test_a_drive_s_prefetch_that_yields_mid_stream_hands_the_waiting_demand_its_queued_time():
    """A drive streams a prefetch in chunks of ``c`` seconds after its latency ``L``; a demand submitted half a
    chunk into the third chunk waits for that chunk's end (L + 3c), its requests queued in the drive meanwhile, so
    the half chunk it waited comes off its latency. The rest of the prefetch then streams behind it, latency hidden
    (it has waited longer than L), and the drive is never idle."""
    calendar = Calendar()
    profile = get_profile("h100-pcie5")
    chunk = 1 << 20
    drive = SsdChannel(calendar, profile.ssd, profile.ssd_link, chunk)
    drive.preemptive = True
    rate, latency = drive.bandwidth_bytes_per_s, drive.latency_s
    c = chunk / rate
    assert c / 2 < latency  # the wait is shorter than the latency: all of it is hidden
    prefetch = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", [drive], PREFETCH)
    demand = Transfer(calendar, 1, 2_000_000, "ssd", "hbm", [drive], DEMAND)
    prefetch.start()
    calendar.run(until=latency + 2.5 * c)
    demand.start()
    calendar.run()
    yielded = latency + 3 * c
    assert demand.arrived_at == pytest.approx(yielded + (latency - c / 2) + 2_000_000 / rate, rel=1e-12)
    assert prefetch.arrived_at == pytest.approx(demand.arrived_at + (10_000_000 - 3 * chunk) / rate, rel=1e-12)
    assert drive.preemptions == 1 and drive.bytes_carried == 12_000_000
    assert drive.busy_s == pytest.approx(prefetch.arrived_at, rel=1e-12)


def test_a_pre_empted_prefetch_keeps_its_first_chunk_s_time_for_the_next_hop_s_credit():
    """A 10 MB prefetch crosses two hops (1 GB/s, then an idle 0.5 GB/s, 1 MB chunks); a demand on the first hop
    alone pre-empts it after its first chunk (1.001 ms) and holds the hop until 3.002 ms; the prefetch's other 9 MB
    end at 12.003 ms. Its first chunk was ready for the second hop at 1.001 ms, not when it resumed: the second
    hop is credited with what it could carry from then, 11.002 ms of its 20.001 ms, so the prefetch lands at
    12.003 + 8.999 ms."""
    calendar = Calendar()
    first = _preemptive_link(calendar)
    second = Channel(calendar, "slow", 0.5e9, 1e-6, 1_000_000)
    prefetch = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", [first, second], PREFETCH)
    demand = Transfer(calendar, 1, 2_000_000, "ddr", "hbm", [first], DEMAND)
    prefetch.start()
    calendar.run(until=1e-3)
    demand.start()
    calendar.run()
    assert demand.arrived_at == pytest.approx(1.001e-3 + 1e-6 + 2e-3, rel=1e-9)
    read_done = demand.arrived_at + 1e-6 + 9e-3
    assert prefetch.arrived_at == pytest.approx(read_done + (1e-6 + 20e-3) - (read_done - 1.001e-3), rel=1e-9)
    assert first.preemptions == 1 and second.bytes_carried == 10_000_000


def test_a_prefetch_in_its_last_chunk_finishes_first_and_a_plain_channel_never_yields():
    for preemptive, arrives in ((True, 9.5e-3), (False, 2.5e-3)):
        calendar = Calendar()
        channel = _preemptive_link(calendar)
        channel.preemptive = preemptive
        prefetch = Transfer(calendar, 0, 10_000_000, "ddr", "hbm", [channel], PREFETCH)
        demand = Transfer(calendar, 1, 2_000_000, "ddr", "hbm", [channel], DEMAND)
        prefetch.start()
        calendar.run(until=arrives)
        demand.start()
        calendar.run()
        assert prefetch.arrived_at == pytest.approx(1e-6 + 10e-3)
        assert demand.arrived_at == pytest.approx(prefetch.arrived_at + 1e-6 + 2e-3)
        assert channel.preemptions == 0


def test_a_pre_empted_prefetch_keeps_the_chunks_credited_while_upstream_read():
    """A 10 MB prefetch read at 1 GB/s (1 MB chunks) reaches an idle 4 GB/s link: 9 MB are credited as carried
    during the read, so its link service is the last chunk (2 us latency + 0.25 ms). A demand that reaches the
    link during that latency takes it over at the chunk boundary; the prefetch then carries only its last 1 MB
    (it used to carry all 10 MB again). One that arrives during the last chunk's bytes waits for it."""
    read_done = 1e-6 + 10e-3
    for arrives, demand_lands, prefetch_lands in (
            (read_done + 1e-6, read_done + 1e-6 + 2e-6 + 0.5e-3, read_done + 1e-6 + 2e-6 + 0.5e-3 + 2e-6 + 0.25e-3),
            (read_done + 0.1e-3, read_done + 2e-6 + 0.25e-3 + 2e-6 + 0.5e-3, read_done + 2e-6 + 0.25e-3)):
        calendar = Calendar()
        drive, link = _channel_pair(calendar, 1e9, 4e9, 1_000_000)
        link.preemptive = True
        prefetch = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", [drive, link], PREFETCH)
        demand = Transfer(calendar, 1, 2_000_000, "ddr", "hbm", [link], DEMAND)
        prefetch.start()
        calendar.run(until=arrives)
        demand.start()
        calendar.run()
        assert demand.arrived_at == pytest.approx(demand_lands, rel=1e-9)
        assert prefetch.arrived_at == pytest.approx(prefetch_lands, rel=1e-9)
        assert link.preemptions == (arrives < read_done + 2e-6)
        assert link.bytes_carried == 12_000_000


def test_a_demand_in_a_credited_prefetch_s_latency_takes_the_link_at_once():
    """The link was idle only 1 us before a prefetch's read ended (4 KB credited): a demand arriving while that
    prefetch is still in its latency takes the link at once, as with no credit (it waited for the rest of a
    chunk, 249 us)."""
    calendar = Calendar()
    drive, link = _channel_pair(calendar, 1e9, 4e9, 1_000_000)
    link.preemptive = True
    prefetch = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", [drive, link], PREFETCH)
    prefetch.start()
    calendar.run(until=10e-3 - (2e-6 + 1e-3))
    Transfer(calendar, 1, 4_000_000, "ddr", "hbm", [link], DEMAND).start()  # keeps the link busy until 10 ms
    calendar.run(until=10e-3 + 1.5e-6)  # the read ended at 10.001 ms: the prefetch is in its 2 us latency
    demand = Transfer(calendar, 2, 1_000_000, "ddr", "hbm", [link], DEMAND)
    demand.start()
    calendar.run()
    assert demand.arrived_at == pytest.approx(10e-3 + 1.5e-6 + 2e-6 + 0.25e-3, rel=1e-9)
    assert link.preemptions == 1 and link.bytes_carried == 15_000_000
    # The 4 KB credited are not a whole chunk: the prefetch yielded none, so it carries all 10 MB afterwards, its
    # credit gone with the time the link then spent on the demand.
    assert prefetch.arrived_at == pytest.approx(demand.arrived_at + 2e-6 + 2.5e-3, rel=1e-9)


def test_a_demand_taking_a_link_over_gets_no_credit_for_the_time_the_link_was_busy():
    """A 10 MB prefetch occupies a 4 GB/s link from t = 0; a 2 MB demand read from a 1 GB/s drive takes it over.
    The demand's cut-through credit may only count time the link sat idle, so the link needs at least the 12 MB
    over its bandwidth (it carried them in 2.76 ms, 3 ms being the least)."""
    calendar = Calendar()
    drive, link = _channel_pair(calendar, 1e9, 4e9, 1_000_000)
    link.preemptive = True
    prefetch = Transfer(calendar, 0, 10_000_000, "ddr", "hbm", [link], PREFETCH)
    demand = Transfer(calendar, 1, 2_000_000, "ssd", "hbm", [drive, link], DEMAND)
    prefetch.start()
    demand.start()
    calendar.run()
    assert link.preemptions == 1 and link.bytes_carried == 12_000_000
    assert link.busy_s >= 12_000_000 / 4e9
    # The demand reaches the link at 2.001 ms, waits for the chunk in flight (to 2.002 ms), then carries its 2 MB.
    assert demand.arrived_at == pytest.approx(2e-6 + 2e-3 + 2e-6 + 0.5e-3, rel=1e-9)


def test_a_preempted_prefetch_resumes_before_later_prefetches_and_crosses_every_hop_whole():
    calendar = Calendar()
    first, second = _preemptive_link(calendar), _preemptive_link(calendar)
    order = []
    hops = [first, second]
    early = Transfer(calendar, 0, 10_000_000, "ssd", "hbm", hops, PREFETCH, on_done=order.append)
    late = Transfer(calendar, 1, 3_000_000, "ssd", "hbm", hops, PREFETCH, on_done=order.append)
    demand = Transfer(calendar, 2, 2_000_000, "ssd", "hbm", hops, DEMAND, on_done=order.append)
    early.start()
    calendar.run(until=1e-3)
    late.start()
    demand.start()
    calendar.run()
    assert [t.key for t in order] == [2, 0, 1]
    assert first.bytes_carried == second.bytes_carried == 15_000_000
    assert all(t.hop_bytes == t.size_bytes for t in order)


def test_calendar_runs_events_in_time_then_creation_order_and_stops_at_a_mark():
    calendar = Calendar()
    ran = []
    calendar.schedule(2.0, ran.append, "late")
    calendar.schedule(1.0, ran.append, "first at 1")
    wake = calendar.mark(1.0)  # a waiter whose wake-up at t=1 was arranged now
    calendar.schedule(1.0, ran.append, "second at 1")
    calendar.advance(wake)
    assert ran == ["first at 1"] and calendar.now == 1.0
    calendar.run()
    assert ran == ["first at 1", "second at 1", "late"]


def test_waiting_for_a_transfer_that_was_never_started_is_an_error_not_a_hang():
    calendar = Calendar()
    channel = Channel(calendar, "link", 1e9, 0.0, 1 << 20)
    transfer = Transfer(calendar, 1, 1000, "ddr", "hbm", [channel], DEMAND)  # never started
    with pytest.raises(RuntimeError, match="can never arrive"):
        calendar.run_until(Arrival(calendar, [transfer]))


def test_the_stream_can_wake_exactly_when_now_plus_the_difference_misses_the_time():
    now, when = 1.969903153219066e-07, 1.8809674164643634e-06
    assert now + (when - now) != when  # one rounding step off
    env = simpy.Environment()
    env.run(until=now)

    def waiter():
        while env.now != when:
            yield timeout_towards(env, when)

    env.run(until=env.process(waiter()))
    assert env.now == when


def test_staging_buffer_serves_reads_first_come_first_served_as_space_frees():
    calendar = Calendar()
    buffer = StagingBuffer(calendar, 10)
    started = []
    for name in ("a", "b", "c"):
        buffer.acquire(6, lambda name=name: started.append((name, calendar.now)))
    calendar.run()
    assert started == [("a", 0.0)]  # b and c wait: 4 bytes are free
    calendar.schedule(1.0, lambda _: buffer.release(6))
    calendar.run()
    assert started == [("a", 0.0), ("b", 1.0)]
    assert buffer.peak_bytes == 6 and buffer.free_bytes == 4


# ------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("placement", ["hbm", "ddr", "ssd"])
def test_energy_components_are_the_ledgers_work_at_the_profiles_prices_and_sum_to_the_total(placement):
    """Each component rebuilt from the ledger's bytes, FLOPs and collectives at the catalog profile's own figures
    (GPUDirect Storage: an SSD read crosses the drive's link and the host link, straight into HBM)."""
    sim, results = run(small(placement=placement, gpus=2, **{"cache.capacity_experts": 200}))  # 2: collectives
    hw, ledger, tokens = sim.hardware, sim.ledger, results.summary["tokens"]
    assert hw.gpudirect_storage and sim.plan.gpus == 2
    assert set(ledger.collective_bytes) == {hw.nvlink.name} and ledger.collective_bytes[hw.nvlink.name] > 0
    energy = results.summary["energy_j_per_token"]
    moved = {f"{route.src}->{route.dst}": 8 * size for route, size in ledger.bytes_by_route().items()}
    assert set(moved) == ({"ddr->hbm"} if placement == "ddr" else {"ssd->hbm"} if placement == "ssd" else set())
    ddr_bits, ssd_bits = moved.get("ddr->hbm", 0), moved.get("ssd->hbm", 0)
    pj = {
        "compute": ledger.flops * hw.gpu.pj_per_flop
        + 8 * (ledger.l1_bytes * hw.gpu.l1_pj_per_bit + ledger.hbm_read_bytes * hw.gpu.l2_pj_per_bit),
        "hbm": 8 * ledger.hbm_read_bytes * hw.gpu.hbm.read_pj_per_bit
        + (ddr_bits + ssd_bits) * hw.gpu.hbm.write_pj_per_bit,
        "ddr": ddr_bits * hw.ddr.read_pj_per_bit,
        "ssd": ssd_bits * hw.ssd.read_pj_per_bit,
        "link": (ddr_bits + ssd_bits) * hw.host_link.pj_per_bit + ssd_bits * hw.ssd_link.pj_per_bit
        + 8 * ledger.collective_bytes[hw.nvlink.name] * hw.nvlink.pj_per_bit,
    }
    static_w = hw.gpu.static_power_w + hw.gpu.hbm.static_power_w + hw.ddr.static_power_w + hw.ssd.static_power_w
    expected = {name: joules * 1e-12 / tokens for name, joules in pj.items()}
    expected["static"] = sim.plan.gpus * static_w * results.step_latency_s.sum() / tokens
    for name in COMPONENTS:
        assert energy[name] == pytest.approx(expected[name], rel=1e-9), name
    assert energy["total"] == pytest.approx(sum(expected.values()), rel=1e-12)


def test_hbm_only_moves_nothing_from_ddr_or_ssd():
    _, results = run(small(placement="hbm"))
    s = results.summary
    assert s["bytes_moved"] == {}
    assert s["energy_j_per_token"]["ddr"] == 0 and s["energy_j_per_token"]["ssd"] == 0
    assert s["hit_rate"] == {"hbm": None, "ddr": None}
    assert s["stall_s_per_token"] == 0


def test_bytes_into_hbm_equal_bytes_out_of_lower_tiers_with_three_tiers():
    sim, results = run(small(placement="ssd", **{"cache.capacity_experts": 150, "ddr_cache.enabled": True,
                                                 "ddr_cache.capacity_experts": 400}))
    moved = sim.ledger.bytes_by_route()
    into_hbm = sum(size for route, size in moved.items() if route.dst == "hbm")
    misses = int(results.step_misses.sum())
    assert into_hbm == misses * sim.spec.expert_bytes > 0
    # Each byte crossed the channels of its own route: the drives carried exactly the SSD reads (a DDR-cache hit
    # never touches a drive), the host links every byte into HBM.
    from_ssd = sum(size for route, size in moved.items() if route.src == "ssd")
    from_ddr = sum(size for route, size in moved.items() if route.src == "ddr")
    assert from_ssd > 0 and from_ddr > 0 and from_ssd + from_ddr == into_hbm
    carried = {kind: sum(c.bytes_carried for c in sim.channels if c.kind == kind) for kind in ("ssd", "link")}
    assert carried == {"ssd": from_ssd, "link": into_hbm}
    assert results.summary["hit_rate"]["ddr"] is not None


def test_energy_per_byte_matches_the_profile_closed_form():
    """Streaming from DDR with no reuse: moved bits x (DDR read + link + HBM write)."""
    sim, results = run(small(**{"cache.enabled": False}))
    hw = sim.hardware
    bits = 8 * sum(results.summary["bytes_moved"].values())
    tokens = results.summary["tokens"]
    energy = results.summary["energy_j_per_token"]
    assert energy["ddr"] * tokens == pytest.approx(bits * hw.ddr.read_pj_per_bit * 1e-12)
    assert energy["link"] * tokens == pytest.approx(bits * hw.host_link.pj_per_bit * 1e-12)
    elapsed = results.step_latency_s.sum()
    static = hw.gpu.static_power_w + hw.gpu.hbm.static_power_w + hw.ddr.static_power_w + hw.ssd.static_power_w
    assert energy["static"] * tokens == pytest.approx(static * elapsed, rel=1e-9)
    gpus = sim.plan.gpus
    devices = {"gpu": hw.gpu.static_power_w + hw.gpu.hbm.static_power_w, "ddr": hw.ddr.static_power_w,
               "ssd": hw.ssd.static_power_w}
    line = "static by device  " + "   ".join(f"{name} {w * elapsed / tokens:.3f} J ({gpus * w:,.0f} W)"
                                           for name, w in devices.items())
    assert line in metrics.format_table(results.summary, results).splitlines()


def test_placements_order_energy_and_ssd_override_scales_it():
    totals = {p: run(small(placement=p, **{"cache.capacity_experts": 150}))[1].summary["energy_j_per_token"]
              for p in ("hbm", "ddr", "ssd")}
    assert totals["hbm"]["total"] < totals["ddr"]["total"] < totals["ssd"]["total"]
    cheap = run(small(placement="ssd", **{"cache.capacity_experts": 150, "energy.ssd_read_pj_per_bit": 10.0}))[1]
    ratio = cheap.summary["energy_j_per_token"]["ssd"] / totals["ssd"]["ssd"]
    assert ratio == pytest.approx(10.0 / get_profile("h100-pcie5").ssd.read_pj_per_bit)


def test_same_seed_same_results_and_the_seed_matters():
    a = run(small(**{"cache.capacity_experts": 120}))[1].summary
    b = run(small(**{"cache.capacity_experts": 120}))[1].summary
    c = run(small(seed=7, **{"cache.capacity_experts": 120}))[1].summary
    assert a == b
    assert a != c


_DISPATCH = ("import json, numpy\n"
             "try:\n    from numpy._core import _multiarray_umath as m\n"
             "except ImportError:\n    from numpy.core import _multiarray_umath as m\n"
             "print(json.dumps([t for t in m.__cpu_dispatch__ if m.__cpu_features__.get(t)]))")


@pytest.mark.parametrize("changes", [
    [],  # the default scenario: the transition prefetcher over the built-in synthetic trace
    ["--set", "cache.policy=finemoe"],  # the router scores the generator draws
    ["--set", "prefetch.policy=expert_map"],  # the nearest stored maps
    ["--set", "cache.policy=learned", "--set", "workload.routing=uniform"],
])
def test_results_do_not_depend_on_the_cpus_vector_instructions(changes):
    """numpy picks its selection, sort, log and exp code by the CPU's vector instructions, and they differ in
    the order of equal keys and in the last bit. The same run with that choice turned off (numpy's baseline code
    only) gives byte-identical output."""
    import os
    import subprocess
    import sys

    def run_with(disabled: str, *args) -> str:
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True).stdout

    in_use = json.loads(run_with("", "-c", _DISPATCH))  # the targets this CPU runs
    assert json.loads(run_with(" ".join(in_use), "-c", _DISPATCH)) == []  # all of them off
    simulate = ["-m", "tierflow", "simulate", "--scenario", "ssd_prefetch", "--set", "workload.decode_tokens=100",
                *changes, "--json", "--quiet"]
    best, baseline = run_with("", *simulate), run_with(" ".join(in_use), *simulate)
    assert json.loads(best)["tokens"] == 100
    assert best == baseline


def test_batch_needs_the_union_of_its_experts():
    sim, results = run(small(**{"cache.enabled": False, "workload.batch_size": 4}))
    step = sim.workload.steps[0]
    for layer, experts in enumerate(step.experts):
        assert sorted(experts.tolist()) == sorted(set(step.rows[:, layer, :].ravel().tolist()))
        assert step.tokens_per_expert[layer].sum() == 4 * sim.spec.top_k
    assert results.summary["tokens"] == 4 * len(sim.workload.steps)


# ------------------------------------------------------------------------------------------ command line

JSON_KEYS = {"scenario", "model", "batch_size", "tokens", "latency_s_per_token", "tokens_per_s",
             "stall_s_per_token", "hit_rate", "bytes_moved", "energy_j_per_token", "prefetch", "peak_hbm_bytes"}


def test_simulate_json_has_exactly_the_documented_keys(tmp_path):
    out = tmp_path / "r.h5"
    result = run_cli("simulate", "--scenario", "ssd_offload", "--set", "workload.decode_tokens=3", "--json",
                     "--out", out, check_status=0)
    summary = json.loads(result.stdout)
    assert set(summary) == JSON_KEYS
    assert set(summary["latency_s_per_token"]) == {"mean", "p50", "p99"}
    assert set(summary["hit_rate"]) == {"hbm", "ddr"}
    assert set(summary["energy_j_per_token"]) == {"total", *COMPONENTS}
    assert set(summary["prefetch"]) >= {"issued", "useful", "late", "wasted_bytes"}
    with h5py.File(out) as f:
        assert json.loads(f.attrs["summary_json"]) == summary
        assert len(f["steps/latency_s"]) == 3
        assert f["layers/misses"][:].sum() == f["steps/misses"][:].sum()
        lookups = sum(f[f"steps/{name}"][:].sum() for name in ("hits", "in_flight", "misses"))
        hits = f["steps/hits"][:].sum() + f["steps/in_flight"][:].sum()
        assert hits / lookups == pytest.approx(summary["hit_rate"]["hbm"])
        assert len(f["channels/name"]) == len(f["channels/busy_s"]) == 2 * 8  # a drive and a link per GPU
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_a_run_of_64_steps_or_more_shows_progress_on_stderr_unless_quiet(command):
    def stderr(steps, *flags):
        result = run_cli(command, "--scenario", "hbm_only", "--set", f"workload.decode_tokens={steps}", "--json",
                         *flags, check_status=0)
        json.loads(result.stdout)  # stdout holds the JSON document only
        return result.stderr

    assert "simulating hbm_only" in stderr(64)
    assert stderr(63) == stderr(64, "--quiet") == ""


def test_simulate_out_has_the_per_step_prefetch_series(tmp_path):
    out = tmp_path / "p.h5"
    summary = json.loads(run_cli("simulate", "--scenario", "ssd_prefetch", "--set", "workload.decode_tokens=40",
                                 "--json", "--quiet", "--out", out, check_status=0).stdout)["prefetch"]
    assert summary["issued"] > 0
    with h5py.File(out) as f:
        for key in ("issued", "useful", "late", "wasted_bytes", "on_target"):
            series = f[f"steps/prefetch_{key}"][:]
            assert len(series) == 40 and int(series.sum()) == summary[key]
        assert (f["steps/prefetch_late"][:] == f["steps/in_flight"][:]).all()
        assert f["steps/prefetch_issued"][:8].sum() == 0  # transition watches 8 steps before it proposes


@pytest.mark.parametrize("scenario", ["hbm_only", "ddr_offload", "ssd_offload", "ssd_prefetch", "three_tier"])
def test_shipped_scenarios_load(scenario):
    assert load_scenario(scenario).name == scenario


BAD_SCENARIOS = {
    "unknown key": (["--set", "cache.size=3"], "valid keys: name"),
    "unknown section key": (["--set", "nonsense=1"], "valid keys"),
    "wrong type": (["--set", "workload.batch_size=many"], "expected int"),
    "negative": (["--set", "workload.batch_size=-1"], "batch_size must be > 0"),
    "bad placement": (["--set", "placement=tape"], "must be one of hbm, ddr, ssd"),
    "unknown policy": (["--set", "cache.policy=magic"], "valid: "),
    "unknown prefetcher": (["--set", "prefetch.policy=magic"], "valid: "),
    # A cache the run does not build still has its policy and parameters checked, as the prefetcher has.
    "parameter of a cache that is off": (["--scenario", "hbm_only", "--set", "cache.params.x=1"],
                                         "cache policy 'lru': unknown parameter(s) x"),
    "parameter of a DDR cache that is off": (["--set", "ddr_cache.params.x=1"],
                                             "ddr_cache: cache policy 'lru': unknown parameter(s) x"),
    "unknown policy of a DDR cache that is off": (["--set", "ddr_cache.policy=magic"],
                                                  "ddr_cache: unknown cache policy 'magic'; valid: "),
    "unknown model": (["--set", "model=gpt-9"], "deepseek-r1"),
    "unknown hardware": (["--set", "hardware=abacus"], "h100-pcie5"),
    "too big": (["--set", "cache.capacity_experts=99999"], "HBM is free"),
    "too big for a smaller model": (["--set", "model=mixtral-8x7b", "--set", "cache.capacity_experts=3712"],
                                    "the model has only 32 experts per GPU, which a cache of 32 per GPU holds"),
    "too small": (["--set", "cache.capacity_experts=8"], "working set"),
    "unknown scenario": (["--scenario", "nope"], "ssd_prefetch"),
    "nan energy": (["--set", "energy.hbm_read_pj_per_bit=nan", "--json"], "must be a finite number, got nan"),
    "inf energy": (["--set", "energy.gpu_static_w=inf"], "must be a finite number, got inf"),
    "nan plugin parameter": (["--set", "prefetch.params.accuracy=nan"], "prefetch.params.accuracy"),
    "negative seed": (["--set", "seed=-1"], "seed must be >= 0"),
    "negative prefetcher seed": (["--set", "prefetch.policy=oracle", "--set", "prefetch.params.seed=-1"],
                                 "prefetcher 'oracle': seed must be >= 0"),
    "too many sequences": (["--set", "workload.synthetic_sequences=1000000000"],
                           "workload.synthetic_sequences = 1000000000 exceeds"),
    "directory": (["--scenario", "."], "is a directory"),
    "device": (["--scenario", "/dev/null"], "scenario file /dev/null: not a regular file"),
    "no scenario": (["--scenario", ""], "no scenario named; shipped: ddr_offload"),
    "not a count": (["--set", "workload.batch_size=1e300"], "expected int, got 1e+300"),
    "skip with uniform routing": (["--set", "workload.routing=uniform", "--set", "workload.skip_tokens=3"],
                                  "workload.skip_tokens = 3 has no effect"),
    "prefetcher with copies ahead and no cache": (
        ["--scenario", "ssd_prefetch", "--set", "timing.expert_copies=ahead", "--set", "cache.enabled=false"],
        "prefetch.policy = 'transition' has no effect"),
    "huge decode": (["--set", "workload.skip_tokens=1000000000000"], "workload.skip_tokens: the built-in trace"),
    "a billion GPUs": (["--set", "gpus=1000000000"], "gpus must be between 1 and 65536"),
    "huge prefetch budget": (["--set", f"prefetch.budget_experts={2**63}"], "budget_experts' must be <="),
    "history past the last layer": (["--set", "prefetch.policy=speculative_gate", "--set",
                                     "prefetch.params.history=59"], "history = 59 exceeds the model's 58 MoE layers"),
    "prefetcher without a cache": (["--scenario", "ssd_prefetch", "--set", "cache.enabled=false"],
                                   "prefetch.policy = 'transition' has no effect with cache.enabled = false"),
    "a streamed layer larger than free HBM": (
        ["--set", "model=mixtral-8x7b", "--set", "hardware=desktop-5070ti", "--set", "gpus=1", "--set",
         "workload.batch_size=16", "--set", "workload.context_length=6400", "--set", "cache.enabled=false"],
        "one layer's working set of 8 experts per GPU needs 2.8 GB of HBM but only 0.5 GB is free"),
    "weights larger than a one-GPU profile's HBM": (["--set", "hardware=desktop-5070ti", "--set", "gpus=1"],
                                                    "or another profile (this one has no GPU-to-GPU links)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_is_one_error_line_with_status_2(case):
    args, fragment = BAD_SCENARIOS[case]
    if "--scenario" not in args:
        args = ["--scenario", "ssd_offload", *args]
    result = run_cli("simulate", *args, "--set", "workload.decode_tokens=2", "--quiet")
    assert_one_line_error(result, fragment)


def test_copies_queued_ahead_that_outgrow_hbm_get_a_note():
    """The paper's model streams every layer's experts ahead: with a KV cache that leaves little room, the experts
    held at once pass the GPU's HBM. The run completes (the timing model is the paper's) and says so on stderr."""
    result = run_cli("simulate", "--scenario", "kyung_mixtral", "--set", "workload.batch_size=64", "--set",
                     "workload.decode_tokens=2", "--set", "workload.context_length=37000", "--json", "--quiet",
                     check_status=0)
    peak = json.loads(result.stdout)["peak_hbm_bytes"]
    hbm = get_profile("kyung2025").gpu.hbm.capacity_bytes
    assert peak > hbm
    assert f"peak HBM use of {peak / 1e9:.1f} GB per GPU exceeds the GPU's {hbm / 1e9:.1f} GB" in result.stderr
    fits = run_cli("simulate", "--scenario", "kyung_mixtral", "--set", "workload.batch_size=64", "--set",
                   "workload.decode_tokens=2", "--json", "--quiet", check_status=0)
    assert "note" not in fits.stderr


def test_kv_cache_check_runs_before_the_workload_is_built(monkeypatch):
    def no_workload(*args, **kwargs):
        raise AssertionError("the workload was built before the HBM check")

    monkeypatch.setattr("tierflow.sim.engine.load_scenario_workload", no_workload)
    for extra in ([], ["workload.routing=uniform"]):
        scenario = load_scenario("ssd_offload", ["workload.batch_size=1000000000", *extra])
        with pytest.raises(TierflowError, match="HBM too small"):
            Simulation(scenario)


def test_a_trace_with_another_top_k_than_the_model_is_rejected(tmp_path):
    spec = get_model("deepseek-r1")
    path = tmp_path / "top2.h5"
    experts = np.tile(np.arange(2), (4, spec.num_moe_layers, 1))
    write_trace(path, experts, [0] * 4, model=spec.name, num_experts=spec.num_routed_experts, source="test")
    with pytest.raises(TierflowError, match="trace has top_k 2 but model 'deepseek-r1' has top_k 8"):
        Simulation(load_scenario("ssd_offload", ["workload.decode_tokens=2"]), trace=str(path))


def test_a_trace_recorded_for_another_model_of_the_same_shape_runs_with_a_note(tmp_path):
    spec = get_model("deepseek-v3")
    path = tmp_path / "v3.h5"
    experts = np.tile(np.arange(spec.top_k), (4, spec.num_moe_layers, 1))
    write_trace(path, experts, [0] * 4, model=spec.name, num_experts=spec.num_routed_experts, source="test")
    result = run_cli("simulate", "--scenario", "ssd_offload", "--trace", path, "--set", "workload.decode_tokens=2",
                     "--json", check_status=0)
    assert result.stderr.strip() == (f"tierflow: note: {path}: the trace was recorded for deepseek-v3; simulated "
                                     "as deepseek-r1, a model of the same shape")
    assert json.loads(result.stdout)["model"] == "deepseek-r1"


def test_a_capacity_override_replaces_the_other_capacity_key_of_the_file():
    scenario = load_scenario("three_tier", ["cache.capacity_bytes=100000000000", "ddr_cache.capacity_bytes=10"])
    assert (scenario.cache.capacity_experts, scenario.cache.capacity_bytes) == (None, 100000000000)
    assert (scenario.ddr_cache.capacity_experts, scenario.ddr_cache.capacity_bytes) == (None, 10)
    unset = load_scenario("ssd_offload", ["cache.capacity_experts=", "prefetch.lookahead=2"])
    assert unset.cache.capacity_experts is None
    assert load_scenario("ssd_offload", ["cache.capacity_experts=none"]).cache.capacity_experts is None
    with pytest.raises(TierflowError, match="set capacity_experts or capacity_bytes, not both"):  # both given
        load_scenario("ssd_offload", ["cache.capacity_bytes=1", "cache.capacity_experts=2"])


def test_a_ddr_cache_too_small_for_an_expert_names_the_figures():
    scenario = load_scenario("three_tier", ["ddr_cache.capacity_bytes=8000", "workload.decode_tokens=1"])
    with pytest.raises(TierflowError, match=r"at least one expert of 0\.\d+ GB; ddr_cache.capacity_bytes = 8000"):
        Simulation(scenario)


def test_impossible_hbm_placement_on_one_gpu_is_an_error():
    with pytest.raises(TierflowError, match="placement = 'hbm' needs"):
        Simulation(load_scenario("hbm_only", ["gpus=1", "workload.decode_tokens=1"]))


def test_model_shapes_feed_the_roofline():
    spec = get_model("olmoe-1b-7b")
    sim = Simulation(small())
    phase = sim.compute.experts([0, 1], [3, 1])
    expected = max(4 * spec.expert_flops_per_token / sim.hardware.gpu.peak_flops,
                   2 * spec.expert_bytes / sim.hardware.gpu.hbm.read_bandwidth_bytes_per_s)
    assert phase.seconds == pytest.approx(expected)


@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_only_data_parallel_groups_with_sequences_read_their_weights(batch):
    """8 GPUs as 8 groups of 1 (attention_tp 1) against one group of 8: the weights are read once per group that
    has a sequence to decode, so with fewer sequences than groups the idle ones read nothing."""
    spec, hardware = get_model("deepseek-r1"), get_profile("h200-pcie5")
    split = ComputeModel(spec, hardware, 8, batch, attention_tp=8, kv_split="even").attention(1024, 0)
    replicated = ComputeModel(spec, hardware, 8, batch, attention_tp=1, kv_split="even").attention(1024, 0)
    weights = spec.non_expert_bytes_per_moe_layer
    assert replicated.hbm_read_bytes - split.hbm_read_bytes == pytest.approx((min(batch, 8) - 1) * weights)
    assert replicated.flops == split.flops


def test_an_energy_that_overflows_is_an_error_not_infinity(cli):
    result = cli("simulate", "--scenario", "ssd_offload", "--set", "workload.decode_tokens=2", "--quiet", "--json",
                 "--set", "energy.ssd_read_pj_per_bit=1e300")
    assert_one_line_error(result, "energy overflows", "ssd")
    assert result.stdout == ""


def test_lookahead_stops_at_the_last_layer(monkeypatch):
    far = Simulation(load_scenario("ssd_prefetch", ["workload.decode_tokens=3", "prefetch.lookahead=100000"]))
    assert far.prefetcher.context.lookahead == far.stream.lookahead == 57
    # Past the last layer a lookahead changes nothing: the same run with the cap lifted (a small model, so the
    # transition prefetcher's table for 40 layers ahead stays small).
    scenario = small(**{"placement": "ssd", "cache.capacity_experts": 100, "prefetch.policy": "transition",
                        "prefetch.params": {"min_observations": 1}, "prefetch.lookahead": 40})
    capped = Simulation(scenario)
    assert capped.stream.lookahead == capped.spec.num_moe_layers - 1
    capped_summary = capped.run().summary
    monkeypatch.setattr(Simulation, "_lookahead", lambda self: self.scenario.prefetch.lookahead)
    lifted = Simulation(scenario)
    assert lifted.stream.lookahead == 40
    assert lifted.run().summary == capped_summary
    assert capped_summary["prefetch"]["issued"] > 0


def test_belady_in_the_ddr_cache_reads_the_future():
    def ddr_hit_rate(policy):
        scenario = load_scenario("three_tier", ["workload.decode_tokens=8", "cache.capacity_experts=800",
                                                "ddr_cache.capacity_experts=800", f"ddr_cache.policy={policy}"])
        return Simulation(scenario).run().summary["hit_rate"]["ddr"]

    assert ddr_hit_rate("belady") > ddr_hit_rate("lru") + 0.005


# SSD reads straight to the GPU (GPUDirect Storage) and staged through host DDR.
SSD_ROUTES = {"direct": {"hardware": "h100-pcie5"}, "staged": {"hardware": "desktop-5070ti", "gpus": 1}}


@pytest.mark.parametrize("route", sorted(SSD_ROUTES))
def test_wasted_prefetch_bytes_are_charged_to_energy(route):
    """Wasted bytes carry the route's per-bit cost; prefetched bytes are part of the ledger's total."""
    sim, results = run(small(placement="ssd", **SSD_ROUTES[route], **{
        "cache.capacity_experts": 120, "prefetch.policy": "previous_token", "prefetch.max_queued": 100}))
    p = results.summary["prefetch"]
    assert p["issued"] > 0 and p["wasted_bytes"] > 0
    hw = sim.hardware
    assert hw.gpudirect_storage == (route == "direct")
    per_bit = _ssd_route_pj_per_bit(hw)
    tokens = results.summary["tokens"]
    assert p["wasted_energy_j_per_token"] * tokens == pytest.approx(8 * p["wasted_bytes"] * per_bit * 1e-12)
    assert p["prefetched_bytes"] == p["issued"] * sim.spec.expert_bytes
    assert p["accuracy"] == pytest.approx(p["useful"] / p["issued"])
    assert sum(results.summary["bytes_moved"].values()) == (int(results.step_misses.sum()) * sim.spec.expert_bytes
                                                            + p["prefetched_bytes"])


def test_a_scenario_file_finds_its_trace_next_to_it(tmp_path):
    from tierflow.trace.synth import generate

    generate("olmoe-1b-7b", 200, tmp_path / "mine.h5", seed=1, workers=1)
    scenario_file = tmp_path / "s.toml"
    scenario_file.write_text('model = "olmoe-1b-7b"\nhardware = "h100-pcie5"\nplacement = "ddr"\n'
                             '[workload]\ntrace = "mine.h5"\ndecode_tokens = 4\n')
    scenario = load_scenario(str(scenario_file))
    assert scenario.workload.trace == str(tmp_path / "mine.h5")
    assert run(scenario)[1].summary["tokens"] == 4


def test_per_layer_scope_keeps_each_layer_within_its_slots():
    sim, results = run(small(**{"cache.scope": "per-layer", "cache.capacity_experts": 16 * 20}))
    hbm = sim.memories[0].hbm
    assert len(hbm.caches) == 16 and all(c.capacity_bytes == 20 * sim.spec.expert_bytes for c in hbm.caches)
    hbm.check_valid()
    assert results.summary["hit_rate"]["hbm"] is not None


BUDGETS = [8, 12, 20, 64, 10, 8, 30, 16, 9, 40, 8, 11, 25, 8, 14, 50]  # one per OLMoE layer, uneven


@pytest.mark.parametrize("scope, capacity", [("global", 200), ("per-layer", 20), ("per-layer", BUDGETS)])
def test_at_batch_1_on_one_gpu_the_simulators_lru_hits_as_replay(scope, capacity):
    """One sequence on one GPU, no prefetch: the simulator's HBM cache sees replay's access order, so LRU's hits
    are replay's (which the libCacheSim tests check) in either scope: the experts a layer pins are its most
    recent, never LRU's victims. (LFU or FIFO may pick a pinned expert in replay, which has no pins, so the two
    can differ.) ``capacity`` is replay's: all experts (global), slots per layer or a list of them
    (``cache.layer_slots``); the scenario's capacity_experts is the total."""
    policy = "lru"
    from tierflow.replay import Requests, replay_reference

    size = ({"cache.layer_slots": capacity} if isinstance(capacity, list) else
            {"cache.capacity_experts": capacity * (16 if scope == "per-layer" else 1)})
    sim, _ = run(small(**{"gpus": 1, "workload.batch_size": 1, "workload.decode_tokens": 40, "cache.policy": policy,
                          "cache.scope": scope, **size}))
    w = sim.workload
    experts = np.stack([np.stack(step.experts) for step in w.steps])  # (tokens, layers, k)
    expected = replay_reference(Requests.from_experts(experts, w.num_experts), policy, capacity, scope)
    hbm = sim.memories[0].hbm
    hits = sum(part.stats.hits for part in getattr(hbm, "caches", [hbm]))
    assert hits == expected > 0


def test_per_layer_scope_smaller_than_the_working_set_is_an_error():
    with pytest.raises(TierflowError, match="slots per layer"):
        Simulation(small(**{"cache.scope": "per-layer", "cache.capacity_experts": 16 * 10}))


def test_layer_slots_split_over_gpus_and_each_layer_is_checked_against_its_own_working_set():
    """cache.layer_slots counts each layer's slots over all GPUs (each GPU ``ceil(slots / gpus)``, at most the
    layer's experts it holds); a layer whose share is below that layer's working set is named."""
    slots = [64] * 16
    slots[3], slots[5] = 29, 1000  # 15 per GPU on 2 GPUs; more than layer 5's 64 experts: 32, all it holds
    slots[6] = 10**400  # too large for a float: whole-number arithmetic
    sim, results = run(small(**{"gpus": 2, "cache.scope": "per-layer", "cache.layer_slots": slots}))
    expert_bytes = sim.spec.expert_bytes
    for memory in sim.memories:
        capacities = [part.capacity_bytes // expert_bytes for part in memory.hbm.caches]
        assert capacities == [32] * 3 + [15, 32, 32] + [32] * 10
    assert sim.plan.hbm_cache_experts == sum(capacities)
    # Layer 3 with 15 slots per GPU misses at least as often as with 32 (LRU at one layer keeps inclusion).
    wide = run(small(**{"gpus": 2, "cache.scope": "per-layer", "cache.capacity_experts": 16 * 64}))[1]
    assert results.layers["misses"][3] > wide.layers["misses"][3]
    np.testing.assert_array_equal(np.delete(results.layers["misses"], 3), np.delete(wide.layers["misses"], 3))
    working_sets = {}
    for step in sim.workload.steps:
        for layer, experts in enumerate(step.experts):
            for gpu in range(2):
                need = int(np.count_nonzero(experts % 2 == gpu))
                working_sets[layer] = max(working_sets.get(layer, 0), need)
    tight = [2 * need for layer, need in sorted(working_sets.items())]
    assert run(small(**{"gpus": 2, "cache.scope": "per-layer", "cache.layer_slots": tight}))[1]
    tight[7] -= 2
    with pytest.raises(TierflowError, match=f"MoE layer 7 has {working_sets[7] - 1} slots per GPU"):
        Simulation(small(**{"gpus": 2, "cache.scope": "per-layer", "cache.layer_slots": tight}))


@pytest.mark.parametrize("changes, message", [
    ({"cache.layer_slots": [20] * 16}, "layer_slots needs scope = 'per-layer'"),
    ({"cache.scope": "per-layer", "cache.layer_slots": [20] * 16, "cache.capacity_experts": 320},
     "set layer_slots or capacity_experts / capacity_bytes, not both"),
    ({"cache.scope": "per-layer", "cache.layer_slots": [20] * 15}, "has 15 budget(s); model 'olmoe-1b-7b' has 16"),
    ({"cache.scope": "per-layer", "cache.layer_slots": [20] * 15 + [0]}, "must hold numbers > 0"),
    ({"cache.scope": "per-layer", "cache.layer_slots": [20] * 15 + [2.5]}, "expected a non-empty list of whole"),
    ({"cache.scope": "per-layer", "cache.layer_slots": 20},
     "expected a non-empty list of whole numbers (in --set, a TOML list: cache.layer_slots=[b0, b1, ...]), got 20"),
])
def test_bad_layer_slots_are_one_line_errors(changes, message):
    with pytest.raises(TierflowError, match=re.escape(message)):
        Simulation(small(**changes))


@pytest.mark.parametrize("section", ["cache", "ddr_cache"])
def test_two_capacities_for_one_cache_are_refused_when_the_scenario_loads(section):
    """A capacity in experts and one in bytes for the same cache: refused by the config itself, before a run."""
    both = {f"{section}.capacity_experts": 64, f"{section}.capacity_bytes": 10**9}
    with pytest.raises(TierflowError, match=re.escape(f"scenario key {section}.capacity_bytes: set capacity_experts "
                                                      "or capacity_bytes, not both")):
        small(**both, **{f"{section}.enabled": True})
    assert small(**both, **{f"{section}.enabled": False})  # a cache that is off is not sized


def test_layer_slots_survive_the_round_trip_a_sweep_point_makes():
    from tierflow.config import scenario_from_table, scenario_to_table

    scenario = small(**{"cache.scope": "per-layer", "cache.layer_slots": BUDGETS})
    assert scenario_from_table(scenario_to_table(scenario)) == scenario


def test_a_set_layer_slots_replaces_the_files_capacity(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('model = "olmoe-1b-7b"\n[cache]\nscope = "per-layer"\ncapacity_experts = 320\n')
    scenario = load_scenario(str(path), ["cache.layer_slots=[" + ",".join(["20"] * 16) + "]"])
    assert scenario.cache.layer_slots == (20,) * 16 and scenario.cache.capacity_experts is None


def test_a_files_section_that_is_not_a_table_is_the_files_error_whatever_set_says(tmp_path):
    """--set names a key inside a section the file got wrong: the error is the file's, as without --set; a
    section that --set itself made a value is --set's."""
    path = tmp_path / "s.toml"
    path.write_text('model = "olmoe-1b-7b"\n[[workload]]\nbatch_size = 1\n')
    files_error = r"^scenario key workload: expected a table, got \[\{'batch_size': 1\}\]$"
    for overrides in ([], ["workload.decode_tokens=2"]):
        with pytest.raises(TierflowError, match=files_error):
            load_scenario(str(path), overrides)
    with pytest.raises(TierflowError, match="^--set workload.decode_tokens: 'workload' is not a table; valid keys: "):
        load_scenario("ssd_offload", ["workload=3", "workload.decode_tokens=2"])


def test_belady_in_the_simulator_bounds_the_online_policies():
    rates = {policy: run(small(**{"cache.policy": policy, "cache.capacity_experts": 60,
                                  "workload.decode_tokens": 40}))[1].summary["hit_rate"]["hbm"]
             for policy in ("lru", "lfu", "fifo", "belady")}
    assert rates["belady"] >= max(rates["lru"], rates["lfu"], rates["fifo"])
    assert rates["belady"] > rates["lru"]


@pytest.mark.parametrize("policy", ["none", "speculative_gate", "expert_map"])
def test_simulate_checks_the_values_of_its_trace(tmp_path, policy):
    import h5py

    from tierflow.trace.synth import generate

    path = tmp_path / "t.h5"
    generate("olmoe-1b-7b", 40, path, seed=1, workers=1)
    with h5py.File(path, "r+") as f:
        experts = f["experts"][()]
        experts[0, 0, 0] = 70  # OLMoE has 64 experts
        f["experts"][...] = experts
    result = run_cli("simulate", "--trace", path, "--set", "model=olmoe-1b-7b", "--set", "cache.capacity_experts=512",
                     "--set", "workload.decode_tokens=2", "--set", f"prefetch.policy={policy}", "--quiet")
    assert_one_line_error(result, str(path), "expert id 70 outside [0, 64) at token 0, layer 0")


def _step_phases(compute, step, context):
    """A step's compute phases: dense layers, each MoE layer's attention and experts, the LM head."""
    phases = [compute.dense_prefix(context), compute.lm_head()]
    for layer, experts in enumerate(step.experts):
        phases.append(compute.attention(context, layer))
        phases.append(compute.experts(experts.tolist(), step.tokens_per_expert[layer].tolist()))
    return phases


def _step_compute_s(compute, step, context):
    """A step's compute alone (no stall)."""
    return sum(phase.seconds for phase in _step_phases(compute, step, context))


def _three_sequences(tmp_path):
    """An OLMoE trace of three sequences of 4, 10 and 3 decode tokens: at batch 2 the third takes the first's
    slot at step 4, and the last three steps decode one sequence."""
    spec = get_model("olmoe-1b-7b")
    rng = np.random.default_rng(3)
    lengths = [4, 10, 3]
    experts = np.stack([[rng.choice(spec.num_routed_experts, spec.top_k, replace=False)
                         for _ in range(spec.num_moe_layers)] for _ in range(sum(lengths))])
    path = tmp_path / "three.h5"
    write_trace(path, experts, np.repeat([0, 1, 2], lengths), model=spec.name,
                num_experts=spec.num_routed_experts, source="test")
    return path


def test_a_step_that_decodes_fewer_sequences_is_charged_for_those_only(tmp_path):
    """Three sequences at batch 2: once the third has taken a finished slot and the other has ended, steps
    decode one sequence, and compute (time and ledger) is that of batch 1. Each sequence attends to its own
    context: the third joins at step 4 with the scenario's context_length, not the first's grown one."""
    path = _three_sequences(tmp_path)
    sim = Simulation(small(**{"placement": "hbm", "gpus": 1, "workload.decode_tokens": 20}), trace=str(path))
    results = sim.run()
    batches = [len(step.sequence_ids) for step in sim.workload.steps]
    assert batches == [2] * 7 + [1] * 3 and results.summary["tokens"] == 4 + 10 + 3
    context = SMALL["workload"]["context_length"]
    # Step i: sequence 1 (10 tokens) has decoded i; sequence 0 (steps 0-3) i, then sequence 2 (steps 4-6) i - 4.
    contexts = [(context + i, context + i) if i < 4 else (context + i - 4, context + i) if i < 7 else context + i
                for i in range(10)]
    flops = hbm_bytes = 0.0
    for step, latency, step_context in zip(sim.workload.steps, results.step_latency_s, contexts, strict=True):
        model = sim.compute_models.get(len(step.sequence_ids))
        assert latency == pytest.approx(_step_compute_s(model, step, step_context), rel=1e-12)
        phases = _step_phases(model, step, step_context)
        flops += sum(phase.flops for phase in phases)
        hbm_bytes += sum(phase.hbm_read_bytes for phase in phases)
    assert sim.ledger.flops == pytest.approx(flops, rel=1e-12)  # the ledger is charged per step's own batch
    assert sim.ledger.hbm_read_bytes == pytest.approx(hbm_bytes, rel=1e-12)
    one = sim.compute_models.get(1)
    last = sim.workload.steps[-1]
    assert one.batch == 1 and one is not sim.compute
    assert one.attention(context, 0).flops == pytest.approx(sim.compute.attention(context, 0).flops / 2)
    assert _step_compute_s(one, last, context) < _step_compute_s(sim.compute, last, context)
    # Per token, a two-sequence step counts twice: each of its tokens waited its latency.
    latency = results.step_latency_s
    weighted = np.repeat(latency, batches)
    assert results.summary["latency_s_per_token"]["mean"] == pytest.approx(float(weighted.mean()), rel=1e-12)
    assert results.summary["latency_s_per_token"]["p99"] == pytest.approx(float(np.percentile(weighted, 99)))
    assert results.summary["latency_s_per_token"]["mean"] != pytest.approx(float(latency.mean()), rel=1e-6)


@pytest.mark.parametrize("model", ["deepseek-r1", "gpt-oss-120b"])
def test_attention_is_linear_in_each_sequences_context(model):
    """A batch's attention is its fixed work plus each sequence's own KV reads: the mean of the phases of the
    batch at each context alone (all of a data-parallel group's sequences at once), per sliding window too."""
    spec, hardware = get_model(model), get_profile("h200-pcie5")
    compute = ComputeModel(spec, hardware, 8, 4, attention_tp=4)  # two groups of two sequences
    contexts = (100, 3000, 7, 5000)
    windowed = [layer - spec.first_moe_layer for layer in spec.sliding_window_layers]
    for layer in sorted({0, *windowed[:1]}):
        mixed = compute.attention(contexts, layer)
        alone = [compute.attention(c, layer) for c in contexts]
        for field in ("seconds", "flops", "hbm_read_bytes", "l1_bytes"):
            assert getattr(mixed, field) == pytest.approx(np.mean([getattr(a, field) for a in alone]), rel=1e-12)
    assert compute.attention((500, 500, 500, 500), 0) == compute.attention(500, 0)
    dense = compute.dense_prefix(contexts).flops
    assert dense == pytest.approx(np.mean([compute.dense_prefix(c).flops for c in contexts]), rel=1e-12)
    with pytest.raises(ValueError, match="3 contexts for a batch of 4"):
        compute.attention((1, 2, 3), 0)


def test_fp8_weights_compute_at_the_fp8_rate_and_the_rest_at_bf16():
    """Compute-bound phases (a batch of 4,096 on one GPU): DeepSeek-R1's FP8 experts and the fixed per-token
    work of its FP8 attention layers (projections, shared experts) run at the H200's FP8 peak, attention over
    the BF16 KV cache and the BF16 LM head at the BF16 peak; the BF16 release runs everything at BF16."""
    hardware = get_profile("h200-pcie5")
    bf16_peak, fp8_peak = hardware.gpu.peak_flops, hardware.gpu.peak_flops_fp8
    assert fp8_peak == pytest.approx(2 * bf16_peak, rel=1e-3)
    batch, context = 4096, 1024
    fp8, bf16 = (ComputeModel(get_model(name), hardware, 1, batch) for name in ("deepseek-r1", "deepseek-r1-bf16"))
    spec = fp8.spec
    assert spec.fp8_experts and spec.fp8_non_expert and not get_model("deepseek-r1-bf16").fp8_experts
    one_expert = [batch]  # every token on one expert: compute-bound
    assert fp8.experts([0], one_expert).seconds == pytest.approx(batch * spec.expert_flops_per_token / fp8_peak)
    assert bf16.experts([0], one_expert).seconds == pytest.approx(batch * spec.expert_flops_per_token / bf16_peak)
    per_attended = fp8._flops_per_attended  # noqa: SLF001
    fixed = spec.non_expert_flops_per_token_per_moe_layer(1) - per_attended
    expected = batch * (fixed / fp8_peak + per_attended * context / bf16_peak)
    assert fp8.attention(context, 0).seconds == pytest.approx(expected, rel=1e-12)
    assert bf16.attention(context, 0).seconds == pytest.approx(batch * (fixed + per_attended * context) / bf16_peak)
    assert fp8.lm_head().seconds == pytest.approx(bf16.lm_head().seconds)  # BF16 in both releases
    # MXFP4 (gpt-oss) is dequantized to BF16 on Hopper: no FP8 rate.
    oss = ComputeModel(get_model("gpt-oss-120b"), hardware, 1, batch)
    assert oss._expert_rate == oss._weight_rate == bf16_peak  # noqa: SLF001


# ------------------------------------------------------------------------------------------ summary figures
# Each figure of the summary against a closed form from the catalog (each test fails on a plausible slip in
# metrics.py, energy.py or the engine that left every other test passing).


def _ssd_route_pj_per_bit(hw):
    per_bit = hw.ssd.read_pj_per_bit + hw.gpu.hbm.write_pj_per_bit + hw.ssd_link.pj_per_bit + hw.host_link.pj_per_bit
    if not hw.gpudirect_storage:
        per_bit += hw.ddr.write_pj_per_bit + hw.ddr.read_pj_per_bit
    return per_bit


@pytest.mark.parametrize("route", sorted(SSD_ROUTES))
def test_coverage_and_prefetch_energy_closed_forms(route):
    sim, results = run(small(placement="ssd", **SSD_ROUTES[route], **{
        "cache.capacity_experts": 120, "prefetch.policy": "previous_token", "prefetch.max_queued": 100}))
    assert sim.hardware.gpudirect_storage == (route == "direct")
    p, tokens = results.summary["prefetch"], results.summary["tokens"]
    misses = int(results.step_misses.sum())
    assert p["useful"] > 0 and misses > 0
    assert p["coverage"] == pytest.approx(p["useful"] / (p["useful"] + misses), rel=1e-12)
    expected = 8 * p["prefetched_bytes"] * _ssd_route_pj_per_bit(sim.hardware) * 1e-12
    assert p["energy_j_per_token"] * tokens == pytest.approx(expected, rel=1e-12)


def test_throughput_and_peak_hbm_closed_forms():
    sim, results = run(small(placement="hbm", gpus=1))
    spec, s = sim.spec, results.summary
    assert s["tokens_per_s"] == pytest.approx(2 * 12 / results.step_latency_s.sum(), rel=1e-12)
    kv = math.ceil(spec.kv_bytes(256 + 12, 2))  # one GPU: the whole KV cache of the batch, for context + steps
    experts = spec.num_moe_layers * spec.num_routed_experts * spec.expert_bytes
    assert s["peak_hbm_bytes"] == math.ceil(spec.total_non_expert_bytes) + kv + experts


def test_stall_and_median_are_per_token_when_the_batch_shrinks(tmp_path):
    spec, path = get_model("olmoe-1b-7b"), _three_sequences(tmp_path)
    sim = Simulation(small(**{"gpus": 1, "cache.enabled": False, "workload.decode_tokens": 20}), trace=str(path))
    results = sim.run()
    link = sim.hardware.host_link
    transfer_s = link.latency_s + spec.expert_bytes / link.bandwidth_bytes_per_s
    batches = [len(step.sequence_ids) for step in sim.workload.steps]
    stall = np.array([sum(map(len, step.experts)) * transfer_s for step in sim.workload.steps])  # closed form
    per_token = np.repeat(stall, batches)
    assert results.summary["stall_s_per_token"] == pytest.approx(per_token.mean(), rel=1e-9)
    assert per_token.mean() != pytest.approx(stall.mean(), rel=1e-6)  # the weighting matters here
    latency = np.repeat(results.step_latency_s, batches)
    assert results.summary["latency_s_per_token"]["p50"] == pytest.approx(float(np.median(latency)), rel=1e-12)
    assert np.median(latency) != pytest.approx(np.median(results.step_latency_s), rel=1e-6)
    # The results file carries each step's tokens, so its per-token figures can be rebuilt from it.
    metrics.write_results_h5(results, tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["steps/tokens"][:].tolist() == batches
        mean = np.average(f["steps/latency_s"][:], weights=f["steps/tokens"][:])
    assert results.summary["latency_s_per_token"]["mean"] == pytest.approx(mean, rel=1e-12)



def test_latency_percentiles_are_those_of_the_per_token_latencies():
    _, results = run(small(placement="ssd", **{"cache.capacity_experts": 120, "workload.decode_tokens": 40}))
    latency = np.repeat(results.step_latency_s, 2)  # batch 2 throughout
    figures = results.summary["latency_s_per_token"]
    for name, q in (("p50", 50), ("p99", 99)):
        assert figures[name] == pytest.approx(float(np.percentile(latency, q)), rel=1e-12)
    assert np.percentile(latency, 99) != pytest.approx(np.percentile(latency, 95), rel=1e-6)  # p99 is told apart


def test_energy_overrides_reprice_their_component_and_only_it():
    base = small(**{"cache.enabled": False})
    _, a = run(base)
    _, b = run(small(**{"cache.enabled": False, "energy.ddr_read_pj_per_bit": 1.0,
                        "energy.hbm_write_pj_per_bit": 2.0}))
    hw = Simulation(base).hardware
    bits = 8 * sum(a.summary["bytes_moved"].values())
    tokens = a.summary["tokens"]
    ea, eb = a.summary["energy_j_per_token"], b.summary["energy_j_per_token"]
    assert eb["ddr"] * tokens == pytest.approx(bits * 1.0e-12, rel=1e-9)
    assert (eb["hbm"] - ea["hbm"]) * tokens == pytest.approx(bits * (2.0 - hw.gpu.hbm.write_pj_per_bit) * 1e-12,
                                                             rel=1e-9)


def _pinned_belady_hits(steps, num_layers, num_experts, capacity):
    """Belady's MIN at layer granularity where a layer cannot evict its own experts (they are in use)."""
    uses = {}
    for s, step in enumerate(steps):
        for layer in range(num_layers):
            for e in step[layer]:
                uses.setdefault(layer * num_experts + e, []).append(s * num_layers + layer)
    cursor = dict.fromkeys(uses, 0)
    resident, hits, order = {}, 0, 0
    for s, step in enumerate(steps):
        for layer in range(num_layers):
            now, pinned = s * num_layers + layer, set()
            for e in step[layer]:
                key = layer * num_experts + e
                u = uses[key]
                while cursor[key] < len(u) and u[cursor[key]] <= now:
                    cursor[key] += 1
                following = u[cursor[key]] if cursor[key] < len(u) else math.inf
                order += 1
                if key in resident:
                    hits += 1
                elif len(resident) >= capacity:
                    victim = max((k for k in resident if k not in pinned),
                                 key=lambda k: (resident[k][0], -resident[k][1]))
                    del resident[victim]
                resident[key] = (following, order)
                pinned.add(key)
    return hits


@pytest.mark.parametrize("capacity", [24, 60, 200])
def test_belady_in_the_simulator_is_the_pinned_offline_optimum(capacity):
    sim, _ = run(small(**{"gpus": 1, "workload.batch_size": 1, "workload.decode_tokens": 40,
                          "cache.policy": "belady", "cache.capacity_experts": capacity}))
    w = sim.workload
    steps = [[x.tolist() for x in step.experts] for step in w.steps]
    assert sim.memories[0].hbm.stats.hits == _pinned_belady_hits(steps, w.num_layers, w.num_experts, capacity)


def test_wasted_prefetches_from_the_ddr_cache_cost_the_ddr_route():
    sim, results = run(small(**{
        "cache.capacity_experts": 160, "workload.batch_size": 4, "workload.decode_tokens": 8, "placement": "ssd",
        "ddr_cache.enabled": True, "ddr_cache.capacity_experts": 800, "prefetch.policy": "oracle",
        "prefetch.params": {"accuracy": 0.5}, "prefetch.lookahead": 2, "prefetch.max_queued": 64}))
    hw, p, tokens = sim.hardware, results.summary["prefetch"], results.summary["tokens"]
    ddr_route = hw.ddr.read_pj_per_bit + hw.host_link.pj_per_bit + hw.gpu.hbm.write_pj_per_bit
    ssd_route = (hw.ssd.read_pj_per_bit + hw.ddr.write_pj_per_bit + hw.ddr.read_pj_per_bit + hw.ssd_link.pj_per_bit
                 + hw.host_link.pj_per_bit + hw.gpu.hbm.write_pj_per_bit)
    wasted_j = p["wasted_energy_j_per_token"] * tokens
    assert p["wasted_bytes"] > 0
    assert 8 * p["wasted_bytes"] * ddr_route * 1e-12 < wasted_j < 8 * p["wasted_bytes"] * ssd_route * 1e-12


def test_static_energy_and_throughput_stop_with_the_last_token():
    sim, results = run(small(placement="ssd", **{"cache.capacity_experts": 120, "prefetch.policy": "oracle",
                                                 "prefetch.params": {"accuracy": 0.3}, "prefetch.lookahead": 3,
                                                 "prefetch.max_queued": 100}))
    elapsed = results.step_latency_s.sum()
    assert sim.calendar.now > elapsed  # prefetches were still landing after the last token
    hw, s = sim.hardware, results.summary
    static_w = hw.gpu.static_power_w + hw.gpu.hbm.static_power_w + hw.ddr.static_power_w + hw.ssd.static_power_w
    assert s["energy_j_per_token"]["static"] * s["tokens"] == pytest.approx(static_w * elapsed, rel=1e-9)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / elapsed, rel=1e-9)
    # Channel figures run until the last transfer landed, after the last token.
    for channel, figures in zip(sim.channels, results.channels, strict=True):
        assert figures["busy_share"] == pytest.approx(channel.busy_s / sim.calendar.now, rel=1e-12)
        assert figures["utilization"] == pytest.approx(
            channel.bytes_carried / channel.bandwidth_bytes_per_s / sim.calendar.now, rel=1e-12)


def test_proposals_refused_for_a_full_queue_wait_a_budget_s_worth_per_gpu(monkeypatch):
    """A proposal refused for a full queue waits in a queue of ``budget_experts`` per GPU (the oldest dropped)."""
    from tierflow.sim.gpu import GpuStream

    lengths, defer = [], GpuStream._defer

    def spy(deferred, key, step, target_layer):
        defer(deferred, key, step, target_layer)
        lengths.append(len(deferred))

    monkeypatch.setattr(GpuStream, "_defer", staticmethod(spy))
    run(small(placement="ssd", **{"cache.capacity_experts": 120, "prefetch.policy": "oracle",
                                  "prefetch.lookahead": 4, "prefetch.budget_experts": 2, "prefetch.max_queued": 1}))
    assert len(lengths) > 100 and max(lengths) == 2


def test_the_lm_head_is_read_unquantized():
    """FP8 releases keep the LM head in BF16: its bytes are the catalog's, not the FP8 weights'."""
    spec = get_model("deepseek-r1")
    head = ComputeModel(spec, get_profile("h200-pcie5"), 8, 1).lm_head()
    assert spec.non_expert_bytes_per_param < spec.unquantized_bytes_per_param == 2
    assert head.hbm_read_bytes == pytest.approx(spec.vocab_size * spec.hidden_size * 2)


def test_offload_copies_take_hbm_bandwidth_only_while_they_run():
    """``timing.offload_takes_hbm_bandwidth`` with copies on demand: a layer computes after its misses land, so
    without prefetching no compute overlaps a copy and the flag changes nothing; with prefetches in flight
    some phases run at the reduced bandwidth."""
    base = ["placement=ddr", "timing.expert_copies=on_demand", "workload.decode_tokens=3", "workload.batch_size=1",
            "cache.enabled=true",
            "cache.capacity_experts=64"]

    def latency(*extra):
        sim = Simulation(load_scenario("kyung_mixtral", [*base, *extra]))
        return sim, sim.run().summary["latency_s_per_token"]["mean"]

    full = get_profile("kyung2025").gpu.hbm.read_bandwidth_bytes_per_s
    sim, on = latency()
    assert sim.compute.hbm_bw == full and set(sim.compute_models._models) == {(1, False)}
    assert on == latency("timing.offload_takes_hbm_bandwidth=false")[1]
    sim, prefetching = latency("prefetch.policy=oracle")
    assert (1, True) in sim.compute_models._models
    assert sim.compute_models.get(1, True).hbm_bw == pytest.approx(full - 900e9)
    assert prefetching > latency("prefetch.policy=oracle", "timing.offload_takes_hbm_bandwidth=false")[1]


def test_the_learned_policy_reads_decode_steps_in_the_simulator_as_in_replay():
    """Its clock is in decode steps, as in replay, where its default weights were trained: layer l of step s is
    at s + l / layers (it read (s + l / layers) / top_k before)."""
    sim = Simulation(small(**{"cache.policy": "learned", "cache.capacity_experts": 100, "workload.batch_size": 1,
                              "workload.decode_tokens": 6}))
    policy = sim.memories[0].hbm.policy
    seen, clock = [], policy.clock
    policy.clock = lambda access: seen.append((access.step, access.layer, clock(access))) or seen[-1][2]
    sim.run()
    layers, top_k = sim.workload.num_layers, sim.workload.top_k
    assert {step for step, _, _ in seen} == set(range(6))
    assert top_k > 1  # so the old clock would differ
    for step, layer, reading in seen:
        assert reading == pytest.approx(step + layer / layers, rel=1e-12)


def test_a_desktop_without_gpudirect_stages_ssd_reads_in_its_little_dram():
    """desktop-5070ti (about 1 GB of free DRAM, no GPUDirect Storage): SSD reads bounce through a staging buffer
    of all that DRAM, and each bit pays the DDR write and read on its way."""
    scenario = small(**{"hardware": "desktop-5070ti", "placement": "ssd", "gpus": 1, "cache.capacity_experts": 256,
                        "workload.decode_tokens": 4})
    sim, results = run(scenario)
    staging = sim.memories[0].paths["ssd"].staging
    ddr = sim.hardware.ddr
    assert staging.capacity_bytes == int(ddr.capacity_bytes) < 2 * 2**30
    assert 0 < staging.peak_bytes <= staging.capacity_bytes and staging.free_bytes == staging.capacity_bytes
    assert sim.memories[0].paths["ssd"].route.via == "ddr"
    bits = 8 * results.summary["bytes_moved"]["ssd->hbm"]
    ddr_j = results.summary["energy_j_per_token"]["ddr"] * results.summary["tokens"]
    assert ddr_j == pytest.approx(bits * (ddr.read_pj_per_bit + ddr.write_pj_per_bit) * 1e-12, rel=1e-9)


@pytest.mark.parametrize("model, tp, share, copies", [
    ("deepseek-r1", 8, 1, 8),  # MLA: one latent head, on every GPU
    ("mixtral-8x7b", 8, 1 / 8, 1), ("mixtral-8x7b", 4, 1 / 4, 1),  # 8 KV heads: one or two a GPU
    ("mixtral-8x7b", 6, 2 / 8, 1),  # 8 heads on 6 GPUs: the fullest holds 2
    ("qwen3-30b-a3b", 8, 1 / 4, 2),  # 4 KV heads on 8 GPUs: each head on two
])
def test_a_tensor_parallel_group_keeps_the_kv_heads_each_gpu_attends_with(model, tp, share, copies):
    """Each GPU of a TP group keeps the KV heads it attends with: MLA's one latent is on every GPU, GQA heads
    are replicated when the group has more GPUs than KV heads, and heads the GPUs do not divide leave the
    fullest GPU one more. Capacity and attention reads follow; "even" splits the cache over the whole group
    (the paper reproduction's assumption)."""
    spec, hardware, batch, context = get_model(model), get_profile("h200-pcie5"), 12, 1024
    assert spec.attention.kv_heads == (1 if spec.attention.kind == "mla" else spec.attention.num_kv_heads)
    heads = ComputeModel(spec, hardware, tp, batch, attention_tp=tp)
    even = ComputeModel(spec, hardware, tp, batch, attention_tp=tp, kv_split="even")
    assert (heads.kv_share, heads.kv_copies) == pytest.approx((share, copies))
    assert (even.kv_share, even.kv_copies) == pytest.approx((1 / tp, 1))
    kv_read = batch * context * spec.kv_bytes_per_token_per_layer  # the group's KV bytes of one layer
    a, b = heads.attention(context, 0), even.attention(context, 0)
    assert a.hbm_read_bytes - b.hbm_read_bytes == pytest.approx(kv_read * (copies - 1), rel=1e-12, abs=1e-3)
    weights = spec.non_expert_bytes_per_moe_layer
    per_gpu = max(a.flops / tp / hardware.gpu.peak_flops,
                  (weights / tp + kv_read * share) / hardware.gpu.hbm.read_bandwidth_bytes_per_s)
    assert a.seconds == pytest.approx(per_gpu + heads._allreduce_s, rel=1e-9)
    scenario = load_scenario("hbm_only", [f"model={model}", f"gpus={tp}", "workload.decode_tokens=1",
                                          f"workload.batch_size={batch}", f"workload.context_length={context - 1}"])
    for split, expected in (("heads", share), ("even", 1 / tp)):
        sim = Simulation(attrs.evolve(scenario, kv_split=split))
        assert sim.plan.kv_bytes_per_gpu == pytest.approx(spec.kv_bytes(context, batch) * expected, abs=1)


def test_hbm_too_small_for_a_replicated_kv_cache_points_at_attention_tp():
    with pytest.raises(TierflowError, match="smaller attention_tp"):
        Simulation(load_scenario("hbm_only", ["workload.batch_size=4096", "workload.decode_tokens=1"]))
    Simulation(load_scenario("hbm_only", ["workload.batch_size=4096", "workload.decode_tokens=1", "attention_tp=1"]))


def test_a_ddr_cache_without_a_capacity_takes_the_whole_ddr_share():
    """SSD reads pass through the DDR cache itself, so no staging buffer is set aside from it: even a desktop with
    1 GB of DRAM gets a DDR cache by default."""
    for hardware, gpus in (("h200-pcie5", 8), ("desktop-5070ti", 1)):
        scenario = load_scenario("three_tier", [f"hardware={hardware}", f"gpus={gpus}", "model=olmoe-1b-7b",
                                                "ddr_cache.capacity_experts=", "cache.capacity_experts=256",
                                                "workload.decode_tokens=1"])
        sim = Simulation(scenario)
        ddr = sim.hardware.ddr.capacity_bytes
        assert sim.plan.ddr_cache_experts == int(ddr) // sim.spec.expert_bytes > 0
        assert sim.memories[0].paths["ssd"].staging is None


def test_collectives_send_their_bytes_over_nvlink_and_pay_its_energy():
    """hbm_only, DeepSeek-R1 on 8 GPUs, batch 1: a ring all-reduce of a token's activations (H x 2 bytes) sends
    2 x 7 of them; the experts' dispatch and combine send each GPU's 8 / 8 copies to its 7 peers, twice. Three
    dense layers all-reduce twice, each MoE layer once plus its all-to-all. Nothing else crosses a link, so the
    link energy is those bits at NVLink's pJ/bit."""
    sim, results = run(load_scenario("hbm_only", ["workload.decode_tokens=2"]))
    spec, nvlink = sim.spec, sim.hardware.nvlink
    h2 = spec.hidden_size * 2
    all_reduce, all_to_all = 2 * 7 * h2, 2 * (spec.top_k * h2 / 8) * 7
    per_step = 2 * spec.num_dense_layers * all_reduce + spec.num_moe_layers * (all_reduce + all_to_all)
    assert dict(sim.ledger.collective_bytes) == pytest.approx({nvlink.name: 2 * per_step}, rel=1e-12)
    link_j = results.summary["energy_j_per_token"]["link"] * results.summary["tokens"]
    assert link_j == pytest.approx(8 * 2 * per_step * nvlink.pj_per_bit * 1e-12, rel=1e-12) and link_j > 0


def test_collectives_across_nodes_split_their_bytes_between_nvlink_and_the_network():
    """12 GPUs in nodes of 8 (the last node holds 4): the all-to-all's GPU pairs are 8 x 7 + 4 x 3 = 68 within a
    node and 64 across; a ring all-reduce over the 12 crosses the network on 2 of its 12 hops."""
    spec, hardware = get_model("deepseek-r1-bf16"), get_profile("kyung2025")
    model = ComputeModel(spec, hardware, 12, 24, attention_tp=12)
    nvlink, network = hardware.nvlink.name, hardware.internode.name
    copies = 24 * spec.top_k * spec.hidden_size * 2 / 12  # each GPU's share of the batch's token copies
    phase = model.experts([0, 1, 2], [8, 8, 8])
    assert dict(phase.collective_bytes) == pytest.approx({nvlink: 2 * copies / 12 * 68, network: 2 * copies / 12 * 64})
    ring = dict(model.attention(1024, 0).collective_bytes)
    sent = 2 * 11 * 24 * spec.hidden_size * 2
    assert ring == pytest.approx({nvlink: sent * 10 / 12, network: sent * 2 / 12})


def test_the_offload_rate_compute_contends_with_is_what_arrives_over_the_host_link():
    """Direct (GPUDirect) SSD reads enter the GPU over its host link, as staged ones do: with a host link slower
    than the drive, copies arrive at the link's rate, and that is the rate taken from compute's HBM bandwidth."""
    from tierflow.sim.engine import offload_bandwidth

    profile = get_profile("h200-pcie5")
    slow = attrs.evolve(profile, host_link=_revised(profile.host_link, bandwidth_bytes_per_s=(8e9, "[DER] test")))
    assert slow.gpudirect_storage and slow.ssd.read_bandwidth_bytes_per_s > 8e9
    scenario = load_scenario("ssd_offload")
    assert offload_bandwidth(scenario, slow) == 8e9
    assert offload_bandwidth(scenario, profile) == sustained_read_bytes_per_s(profile.ssd, profile.ssd_link)
