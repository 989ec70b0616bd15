"""Prefetchers: the protocol every registered prefetcher keeps (proposals only for layers ahead, never a
change to what a layer computes with, never an eviction of a pinned expert), the closed forms that bound
them (no prefetching stalls for exactly the demand transfers; the oracle with enough bandwidth hides them),
the accounting of wasted prefetches, and each prefetcher's own rule on small hand-made inputs."""

from __future__ import annotations

from collections import Counter, deque

import attrs
import h5py
import numpy as np
import pytest

from conftest import scenario_with
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.cache import Access
from tierflow.config import load_scenario
from tierflow.errors import TierflowError
from tierflow.prefetch import PREFETCHERS, PrefetchContext, RoutingEvent, make_prefetcher
from tierflow.prefetch.expert_map import ExpertMap
from tierflow.prefetch.speculative_gate import fit_layer_maps
from tierflow.prefetch.training import load_training_split
from tierflow.sim.engine import Simulation
from tierflow.sim.transfer import PREFETCH
from tierflow.trace.format import TraceWriter, write_trace

SMALL = {
    "name": "small",
    "model": "olmoe-1b-7b",
    "hardware": "h100-pcie5",
    "placement": "ssd",
    "workload": {"batch_size": 2, "decode_tokens": 16, "context_length": 256},
    "cache": {"capacity_experts": 120},
}
ALL_EXPERTS = 16 * 64  # OLMoE: 16 MoE layers x 64 experts, all of which fit one H100's free HBM


def small(**changes):
    return scenario_with(SMALL, **changes)


def run_recorded(scenario):
    """Run a scenario, recording the experts each layer computes with (in order) and every proposal."""
    sim = Simulation(scenario)
    computed = []
    experts_phase = sim.compute.experts

    def record(experts, tokens):
        computed.append(list(experts))
        return experts_phase(experts, tokens)

    sim.compute.experts = record
    proposals = []
    if sim.prefetcher is not None:
        on_routing = sim.prefetcher.on_routing

        def spy(event):
            result = on_routing(event)
            proposals.append((event.layer, list(result)))
            return result

        sim.prefetcher.on_routing = spy
    return sim, sim.run(), computed, proposals


def transfer_s(sim):
    link = sim.hardware.host_link
    return link.latency_s + sim.spec.expert_bytes / link.bandwidth_bytes_per_s


# ------------------------------------------------------------------------------------------ protocol

NAMES = PREFETCHERS.names()


def test_the_issue_prefetchers_are_registered():
    assert {"none", "oracle", "previous_token", "speculative_gate", "expert_map", "transition"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_prefetcher_proposes_only_layers_ahead_and_keeps_the_figures_consistent(name):
    sim, results, _, proposals = run_recorded(small(**{"prefetch.policy": name, "prefetch.lookahead": 2,
                                                       "prefetch.max_queued": 100}))
    num_layers, num_experts = sim.workload.num_layers, sim.workload.num_experts
    wraps = name in {"oracle", "previous_token"}  # these also propose the next step's first layers
    for layer, proposed in proposals:
        for target, expert in proposed:
            assert layer < target <= (layer + 2 if wraps else min(layer + 2, num_layers - 1))
            assert 0 <= expert < num_experts
    if wraps:
        assert any(target >= num_layers for _, proposed in proposals for target, _ in proposed)
    p = results.summary["prefetch"]
    assert p["prefetched_bytes"] == p["issued"] * sim.spec.expert_bytes
    assert 0 <= p["late"] <= p["useful"] <= p["issued"]
    assert p["wasted_bytes"] == (p["issued"] - p["useful"]) * sim.spec.expert_bytes
    if p["issued"]:
        assert p["accuracy"] == pytest.approx(p["useful"] / p["issued"])


@settings(max_examples=12)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 3), batch=st.integers(1, 3),
       capacity=st.sampled_from([40, 80, 300]), lookahead=st.integers(1, 3), budget=st.integers(0, 12),
       max_queued=st.sampled_from([1, 4, 100]))
def test_prefetching_changes_timing_and_bytes_never_what_layers_compute_with(name, seed, batch, capacity, lookahead,
                                                                           budget, max_queued):
    changes = {"workload.batch_size": batch, "workload.decode_tokens": 8, "cache.capacity_experts": capacity,
               "prefetch.lookahead": lookahead, "prefetch.budget_experts": budget, "prefetch.max_queued": max_queued}
    sim, results, computed, _ = run_recorded(small(seed=seed, **changes, **{"prefetch.policy": name}))
    expected = [experts.tolist() for step in sim.workload.steps for experts in step.experts]
    assert computed == expected
    # The same run without prefetching computes with the same experts and looks the same ones up, layer by layer.
    _, alone, computed_alone, _ = run_recorded(small(seed=seed, **changes, **{"prefetch.policy": "none"}))
    assert computed_alone == computed
    for layers in (results.layers, alone.layers):
        layers["lookups"] = layers["hits"] + layers["in_flight"] + layers["misses"]
    np.testing.assert_array_equal(results.layers["lookups"], alone.layers["lookups"])
    # Every demand is a hit, a miss, or a hit on a prefetch still in flight (late).
    demanded = sum(len(e) for e in expected)
    late = results.summary["prefetch"]["late"]
    assert int(results.step_hits.sum() + results.step_misses.sum()) + late == demanded
    assert int(results.step_in_flight.sum()) == late
    assert results.summary["tokens"] == batch * len(sim.workload.steps)
    # The per-step prefetch series add up to the run's figures (the last step takes what the end found unused).
    series = results.step_prefetch
    assert (series is None) == (name == "none")
    if series is not None:
        for key in ("issued", "useful", "late", "wasted_bytes"):
            assert len(series[key]) == len(sim.workload.steps) and (series[key] >= 0).all()
            assert int(series[key].sum()) == results.summary["prefetch"][key]
        np.testing.assert_array_equal(series["late"], results.step_in_flight)
        assert (series["wasted_bytes"] % sim.spec.expert_bytes == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_prefetches_never_evict_an_expert_a_layer_is_using(name):
    """A cache barely above one layer's working set and prefetches allowed to pile up: every expert a layer
    computes with must still be resident (and pinned) when the layer releases it."""
    sim = Simulation(small(**{"cache.capacity_experts": 17, "workload.batch_size": 1, "prefetch.policy": name,
                              "prefetch.budget_experts": 16, "prefetch.max_queued": 100,
                              "prefetch.lookahead": 3}))
    for memory in sim.memories:
        release = memory.release

        def checked(key, memory=memory, release=release):
            assert key in memory.hbm and memory.hbm.pins.get(key, 0) >= 1
            release(key)

        memory.release = checked
        memory.hbm.eviction_listeners.append(lambda key, memory=memory: memory.hbm.check_valid())
    results = sim.run()
    assert results.summary["tokens"] == len(sim.workload.steps)


@settings(max_examples=10)
@given(seed=st.integers(0, 3), batch=st.integers(1, 3), capacity=st.sampled_from([40, 120]),
       max_queued=st.sampled_from([1, 100]))
def test_prefetchers_that_listen_are_told_each_layers_hits_in_flight_and_misses(seed, batch, capacity, max_queued):
    """A prefetcher overriding ``on_demand`` hears every layer's lookup once, before its routing event; the
    experts it hears of are the layer's, and the outcomes add up to the run's hits, misses and late prefetches."""
    previous_token = PREFETCHERS.get("previous_token")
    heard = []

    class Listening(previous_token):
        name = "listening"

        def on_demand(self, event):
            heard.append(("demand", event))

        def on_routing(self, event):
            heard.append(("routing", event.step, event.layer))
            return super().on_routing(event)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PREFETCHERS._classes, "listening", Listening)
        sim = Simulation(small(seed=seed, **{"workload.batch_size": batch, "workload.decode_tokens": 8,
                                             "cache.capacity_experts": capacity, "prefetch.policy": "listening",
                                             "prefetch.max_queued": max_queued}))
    results = sim.run()
    layers = [(step, layer) for step in sim.workload.steps for layer in range(sim.workload.num_layers)]
    assert len(heard) == 2 * len(layers)
    for (step, layer), (kind, event), routing in zip(layers, heard[::2], heard[1::2], strict=True):
        assert kind == "demand" and routing == ("routing", step.index, layer)
        assert (event.step, event.layer) == (step.index, layer)
        assert sorted(event.hits + event.in_flight + event.misses) == sorted(step.experts[layer].tolist())
    events = [event for _, event in heard[::2]]
    assert sum(len(e.hits) for e in events) == int(results.step_hits.sum())
    assert sum(len(e.misses) for e in events) == int(results.step_misses.sum())
    assert sum(len(e.in_flight) for e in events) == results.summary["prefetch"]["late"]


WIDE_EXPERTS = {
    # Mixtral's 352 MB experts in DDR over NVLink-C2C on 8 GPUs: a transfer spans about six layers of compute and
    # the links idle about half the time, so what a demand miss waits behind matters.
    "name": "wide", "model": "mixtral-8x7b", "hardware": "gh200-c2c", "placement": "ddr", "gpus": 8,
    "workload": {"batch_size": 1, "decode_tokens": 16, "context_length": 256}, "cache": {"capacity_experts": 128},
    "prefetch": {"policy": "oracle", "lookahead": 6, "budget_experts": 8, "max_queued": 1},
}


def test_demand_misses_taking_over_from_wrong_prefetches_cut_the_stall():
    """Every prefetch is wrong (oracle, accuracy 0): a demand miss that takes the link over from one at a chunk
    boundary stalls less than one that waits for the whole wrong transfer."""
    stall = {}
    for preempt in (True, False):
        sim = Simulation(scenario_with(WIDE_EXPERTS, **{"prefetch.params": {"accuracy": 0.0},
                                                        "prefetch.preempt": preempt}))
        results = sim.run()
        preemptions = sum(c.preemptions for m in sim.memories for p in m.paths.values() for c in p.hops)
        assert (preemptions > 0) == preempt
        p = results.summary["prefetch"]
        assert sum(results.summary["bytes_moved"].values()) == (int(results.step_misses.sum()) + p["issued"]) * \
            sim.spec.expert_bytes
        stall[preempt] = results.summary["stall_s_per_token"]
    assert stall[True] < 0.95 * stall[False]


@pytest.mark.parametrize("model, capacity", [("mixtral-8x7b", 16), ("olmoe-1b-7b", 128)])
def test_without_gpudirect_storage_wrong_prefetches_neither_pile_up_in_staging_nor_delay_demand(model, capacity):
    """SSD reads wait for host staging space before they reach the drive: those waiting (or granted and not yet
    started) count against max_queued, a demand miss is granted space before waiting prefetches, and prefetches
    leave an expert's room free. Every prefetch wrong (oracle, accuracy 0) then costs about the stall it costs
    with GPUDirect Storage (on Mixtral it cost +95% over none, against +0.2% with GPUDirect, when prefetches queued
    first come first served in the staging buffer; on OLMoE wrong guesses also evict cached experts, with or
    without staging), and the drive's queue never holds more prefetches than max_queued: Mixtral's 352 MB experts
    fill the 1 GB buffer, OLMoE's 12.6 MB ones do not (a budget used to slip through between a grant and the
    read's start)."""
    base = {"model": model, "hardware": "desktop-5070ti", "placement": "ssd", "gpus": 1,
            "workload": {"batch_size": 1, "decode_tokens": 8, "context_length": 256},
            "cache": {"capacity_experts": capacity},
            "prefetch": {"policy": "oracle", "lookahead": 3, "budget_experts": 8, "max_queued": 1,
                         "params": {"accuracy": 0.0}}}
    sim = Simulation(scenario_with(base))
    memory = sim.memories[0]
    assert memory.prefetch_staging is not None  # the staged path is what this tests
    drive, queued_prefetches = memory.prefetch_source, []
    submit = drive.submit

    def counted(transfer):
        submit(transfer)
        queued_prefetches.append(sum(entry[0] == PREFETCH for entry in drive._queue))  # noqa: SLF001

    drive.submit = counted
    wrong = sim.run()
    assert wrong.summary["prefetch"]["issued"] > 0
    assert max(queued_prefetches) <= 1

    def stall(**changes):
        return Simulation(scenario_with(base, **changes)).run().summary["stall_s_per_token"]

    none = {"prefetch.policy": "none", "prefetch.params": {}}
    direct = {"hardware": "h100-pcie5"}  # the same drive class with GPUDirect Storage: no staging
    staged_cost = wrong.summary["stall_s_per_token"] / stall(**none)
    assert staged_cost < 1.05 * stall(**direct) / stall(**direct, **none)


def test_staging_buffer_grants_demand_before_prefetches_and_keeps_room_for_demand():
    from tierflow.sim.calendar import Calendar
    from tierflow.sim.dram import StagingBuffer
    from tierflow.sim.transfer import DEMAND, PREFETCH

    calendar = Calendar()
    buffer = StagingBuffer(calendar, 12, prefetch_reserve_bytes=4)
    started = []
    buffer.acquire(8, lambda: started.append("p1"), PREFETCH)  # 8 + 4 kept for demand fit in 12
    buffer.acquire(4, lambda: started.append("p2"), PREFETCH)  # would eat the demand's room: waits
    calendar.run()
    assert started == ["p1"] and buffer.waiting == 1
    buffer.acquire(4, lambda: started.append("d1"), DEMAND)
    buffer.acquire(4, lambda: started.append("d2"), DEMAND)  # no room left: waits, ahead of p2
    calendar.run()
    assert started == ["p1", "d1"] and buffer.waiting == 2
    calendar.schedule(1.0, lambda _: buffer.release(8))
    calendar.run()
    assert started == ["p1", "d1", "d2"]  # 8 freed: d2 takes 4; p2 would leave none for demand
    calendar.schedule(1.0, lambda _: buffer.release(4))
    calendar.run()
    assert started == ["p1", "d1", "d2", "p2"] and buffer.free_bytes == 4 and buffer.waiting == 0
    # A buffer too small for a prefetch and the reserve grants a prefetch when it is free, or none would start.
    small_buffer = StagingBuffer(calendar, 6, prefetch_reserve_bytes=6)
    small_buffer.acquire(6, lambda: started.append("p3"), PREFETCH)
    calendar.run()
    assert started[-1] == "p3"


def test_each_routing_event_starts_at_most_the_budget():
    sim = Simulation(small(placement="ssd", **{"cache.capacity_experts": 16 * 64, "workload.batch_size": 1,
                                               "prefetch.policy": "oracle", "prefetch.lookahead": 3,
                                               "prefetch.budget_experts": 3, "prefetch.max_queued": 1000}))
    started, start = Counter(), sim.stream._start_prefetch

    def spy(memory, key, target_step, target_layer, step, layer, time):
        started[step, layer] += 1
        start(memory, key, target_step, target_layer, step, layer, time)

    sim.stream._start_prefetch = spy
    sim.run()
    assert max(started.values()) == 3  # 24 proposals a layer, most not resident: the budget binds


def test_prefetchers_that_do_not_listen_cost_no_demand_events():
    sim = Simulation(small(**{"prefetch.policy": "transition"}))
    assert not sim.stream.tells_demand


# ------------------------------------------------------------------------------------------ closed forms


def test_without_prefetching_the_stall_is_the_demand_transfer_time():
    """DDR placement, one GPU, a cache holding every expert: a miss is an expert's first use, each layer's
    misses queue one after another on an idle link, so a step stalls for (first uses) x transfer time."""
    sim, results, _, _ = run_recorded(small(placement="ddr", **{"cache.capacity_experts": ALL_EXPERTS,
                                                                 "prefetch.policy": "none"}))
    seen = set()
    for step, stall in zip(sim.workload.steps, results.step_stall_s, strict=True):
        new = 0
        for layer, experts in enumerate(step.experts):
            keys = {layer * 64 + e for e in experts.tolist()}
            new += len(keys - seen)
            seen |= keys
        assert stall == pytest.approx(new * transfer_s(sim), rel=1e-9)


def _one_new_expert_per_step_trace(path, steps=10, layer=15):
    """OLMoE-shaped routing: every layer uses experts 0..7, except that ``layer`` uses 0..6 and one expert it
    has never used before. So after the first step each step needs exactly one new expert, at that layer."""
    experts = np.tile(np.arange(8), (steps, 16, 1))
    experts[:, layer, 7] = 8 + np.arange(steps)
    with TraceWriter(path, model="olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, source="test") as writer:
        writer.append(experts, np.zeros(steps, dtype=np.int64))
    return steps


def test_oracle_with_enough_bandwidth_hides_every_transfer_after_the_first_step(tmp_path):
    """With the cache holding every expert and a lookahead covering the transfer (fetched from layer 0 for
    layer 15, under 15 layers of compute), the oracle stalls only in the first step, whose first layer no
    routing event precedes; without prefetching every later step stalls for one transfer."""
    trace = tmp_path / "one_new.h5"
    steps = _one_new_expert_per_step_trace(trace)
    common = {"placement": "ddr", "workload.trace": str(trace), "workload.batch_size": 1,
              "workload.decode_tokens": steps, "cache.capacity_experts": ALL_EXPERTS,
              "prefetch.lookahead": 15, "prefetch.budget_experts": 64, "prefetch.max_queued": 100}
    sim, none, _, _ = run_recorded(small(**common, **{"prefetch.policy": "none"}))
    _, oracle, _, _ = run_recorded(small(**common, **{"prefetch.policy": "oracle"}))
    compute_before_last_layer = none.step_latency_s[1] - none.step_stall_s[1]
    assert transfer_s(sim) < compute_before_last_layer  # the bandwidth is enough
    assert none.step_stall_s[1:] == pytest.approx(np.full(steps - 1, transfer_s(sim)), rel=1e-9)
    assert np.all(oracle.step_stall_s[1:] == 0.0)
    assert oracle.step_stall_s[0] <= none.step_stall_s[0]
    p = oracle.summary["prefetch"]
    assert p["accuracy"] == 1.0 and p["wasted_bytes"] == 0
    assert p["late"] <= 15 * 8  # only the first step's prefetches can arrive after their layer started waiting


def test_oracle_hides_the_next_tokens_first_layers_too(tmp_path):
    """Each step needs one new expert, at layer 0, which no routing event of its own step precedes: the oracle
    fetches it during the previous step's layers (a lookahead past the last layer reaches the next step), so
    after the cold first step (whose demand misses also hold up the prefetch for step 1) nothing stalls, while
    every step does without prefetching."""
    trace = tmp_path / "new_at_layer_0.h5"
    steps = _one_new_expert_per_step_trace(trace, layer=0)
    common = {"placement": "ddr", "workload.trace": str(trace), "workload.batch_size": 1,
              "workload.decode_tokens": steps, "cache.capacity_experts": ALL_EXPERTS,
              "prefetch.lookahead": 15, "prefetch.budget_experts": 64, "prefetch.max_queued": 100}
    sim, none, _, _ = run_recorded(small(**common, **{"prefetch.policy": "none"}))
    _, oracle, _, _ = run_recorded(small(**common, **{"prefetch.policy": "oracle"}))
    assert none.step_stall_s[1:] == pytest.approx(np.full(steps - 1, transfer_s(sim)), rel=1e-9)
    assert np.all(oracle.step_stall_s[2:] == 0.0) and 0 < oracle.step_stall_s[1] < none.step_stall_s[1]
    assert oracle.step_misses[1:].sum() == 0  # step 1's new expert was on its way (late), not missed
    p = oracle.summary["prefetch"]
    assert p["accuracy"] == 1.0 and p["wasted_bytes"] == 0  # nothing proposed for a step the run does not have


def test_no_prefetch_is_started_for_a_step_the_run_does_not_have():
    """previous_token proposes the next step's first layers at the last layers of every step, the last one
    included: the engine drops those (they could only be wasted, and would be charged as waste)."""
    sim = Simulation(small(**{"workload.batch_size": 2, "prefetch.policy": "previous_token", "prefetch.lookahead": 3,
                              "prefetch.max_queued": 100, "cache.capacity_experts": 160}))
    steps, starts, start = len(sim.workload.steps), [], sim.stream._start_prefetch  # noqa: SLF001

    def record(memory, key, target_step, target_layer, step, layer, time):
        assert target_step == step + (target_layer <= layer)  # a target at or before this layer: the next step's
        starts.append(target_step)
        start(memory, key, target_step, target_layer, step, layer, time)

    sim.stream._start_prefetch = record  # noqa: SLF001
    sim.run()
    assert steps - 1 in starts  # the last step is prefetched for, from the one before it
    assert max(starts) == steps - 1


def test_a_late_prefetch_is_promoted_by_the_engine():
    """Mixtral from one PM1743 per GPU, the transition prefetcher: a layer that waits for a prefetch in flight
    promotes it to demand priority (ahead of queued prefetches, no longer pre-empted), and the step is shorter
    than with promotion switched off; the promoted bytes still count as prefetched."""
    scenario = load_scenario("kyung_mixtral", [
        "placement=ssd", "workload.batch_size=1", "hardware=kyung2025-pcie5-nvme", "workload.routing=trace",
        "cache.enabled=true", "cache.policy=lru", "cache.capacity_experts=64", "timing.expert_copies=on_demand",
        "workload.decode_tokens=16", "prefetch.policy=transition", "prefetch.lookahead=2"])
    promoted = []
    sim = Simulation(scenario)
    for memory in sim.memories:
        def spy(transfer, memory=memory, promote=memory._promote):  # noqa: SLF001
            promoted.append(transfer)
            promote(transfer)

        memory._promote = spy  # noqa: SLF001
    results = sim.run()
    p = results.summary["prefetch"]
    assert len(promoted) == p["late"] > 0 and all(t.prefetched and t.priority == 0 for t in promoted)
    assert p["prefetched_bytes"] == p["issued"] * sim.spec.expert_bytes
    unpromoted = Simulation(scenario)
    for memory in unpromoted.memories:
        memory._promote = lambda transfer: None  # noqa: SLF001
    assert results.summary["latency_s_per_token"]["mean"] < 0.95 * unpromoted.run().summary["latency_s_per_token"]["mean"]


def test_oracle_accuracy_knob_wastes_bytes_that_are_charged_to_energy():
    base = {"prefetch.policy": "oracle", "prefetch.max_queued": 100, "prefetch.lookahead": 2}
    sim, exact, _, _ = run_recorded(small(**base))
    _, noisy, _, _ = run_recorded(small(**base, **{"prefetch.params": {"accuracy": 0.5, "seed": 3}}))
    assert exact.summary["prefetch"]["wasted_bytes"] == 0
    p = noisy.summary["prefetch"]
    assert p["wasted_bytes"] > 0 and p["accuracy"] < 1.0
    hw = sim.hardware
    per_bit = (hw.ssd.read_pj_per_bit + hw.gpu.hbm.write_pj_per_bit + hw.ssd_link.pj_per_bit + hw.host_link.pj_per_bit)
    if not hw.gpudirect_storage:  # staged through host DDR
        per_bit += hw.ddr.write_pj_per_bit + hw.ddr.read_pj_per_bit
    tokens = noisy.summary["tokens"]
    assert p["wasted_energy_j_per_token"] * tokens == pytest.approx(8 * p["wasted_bytes"] * per_bit * 1e-12)
    # Wasted bytes are part of the bytes moved (and so of the energy), apart from the demand misses.
    moved = sum(noisy.summary["bytes_moved"].values())
    assert moved == int(noisy.step_misses.sum()) * sim.spec.expert_bytes + p["prefetched_bytes"]
    assert p["wasted_energy_j_per_token"] <= p["energy_j_per_token"]


def test_per_layer_slots_leave_each_layer_the_step_demand_bound():
    """Per-layer slots: a prefetch into a layer's slots leaves room there for the most experts one step can ask
    of the layer (batch x top_k, at most the experts it holds), a figure known before the run. Layers with more
    slots than that are prefetched into; layers with no more are not (a prefetch could leave a demand miss
    no room)."""
    from collections import Counter

    base = {"name": "r", "model": "olmoe-1b-7b", "hardware": "h100-pcie5", "placement": "ddr", "gpus": 1,
            "workload": {"batch_size": 2, "decode_tokens": 24, "context_length": 256}}
    bound = 2 * 8  # batch 2 x top-8, below OLMoE's 64 experts per layer
    slots = [bound + 4 if layer % 2 else bound for layer in range(16)]
    sim = Simulation(scenario_with(base, **{"cache.scope": "per-layer", "cache.layer_slots": slots,
                                            "prefetch.policy": "oracle", "prefetch.max_queued": 100}))
    assert sim.memories[0].reserve_bytes == bound * sim.plan.expert_bytes
    per_layer, start = Counter(), sim.stream._start_prefetch  # noqa: SLF001

    def record(memory, key, target_step, target_layer, step, layer, time):
        per_layer[target_layer] += 1
        start(memory, key, target_step, target_layer, step, layer, time)

    sim.stream._start_prefetch = record  # noqa: SLF001
    sim.run()
    assert all(per_layer[layer] > 0 for layer in range(1, 16, 2))
    assert not any(per_layer[layer] for layer in range(0, 16, 2))
    for part in sim.memories[0].hbm.caches:
        part.check_valid()


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_a_run_does_not_depend_on_steps_after_it(tmp_path, scope):
    """Caching and prefetching read nothing of the steps to come beyond the oracle's lookahead: the first steps
    of a run time exactly as the same steps at the head of a longer run. Here the four sequences route alike
    for 12 tokens (8 distinct experts a layer) and apart after (32), so a prefetch reserve sized by the run's
    own widest step would be 8 experts in the short run and 32 in the long one. The short run's last step is
    left out: its prefetches target a step only the longer run has."""
    tokens, layers, experts = 24, 16, 64
    rows = np.empty((4, tokens, layers, 8), dtype=np.int64)
    for sequence in range(4):
        for token in range(tokens):
            first = token * 8 if token < 12 else token * 8 + sequence * 16
            rows[sequence, token] = (first + np.arange(8)) % experts
    trace = tmp_path / "t.h5"
    write_trace(trace, rows.reshape(-1, layers, 8), np.repeat(np.arange(4), tokens), model="olmoe-1b-7b",
                num_experts=experts, source="test")
    changes = {"workload.trace": str(trace), "workload.batch_size": 4, "cache.scope": scope,
               "cache.capacity_experts": {"global": 60, "per-layer": 16 * 36}[scope], "prefetch.policy": "oracle",
               "prefetch.max_queued": 8}
    short = Simulation(small(**changes, **{"workload.decode_tokens": 12}))
    long = Simulation(small(**changes, **{"workload.decode_tokens": 24}))
    short.run()
    long.run()
    head = [(r.latency_s, r.stall_s, r.hits, r.misses, r.prefetch) for r in short.stream.records[:-1]]
    assert head == [(r.latency_s, r.stall_s, r.hits, r.misses, r.prefetch) for r in long.stream.records[:len(head)]]
    assert sum(r.prefetch[0] for r in short.stream.records) > 0  # prefetches started


def test_on_target_counts_the_prefetches_their_own_step_used():
    """Nothing is evicted (a cache of every expert): a prefetch is on target exactly when the step and layer it
    was proposed for route to its expert; a wrong guess a later step routes to is useful but not on target. The
    exact oracle's are all on target."""
    sim = Simulation(small(**{"workload.batch_size": 2, "prefetch.policy": "oracle", "prefetch.lookahead": 2,
                              "prefetch.params": {"accuracy": 0.5, "seed": 2}, "prefetch.max_queued": 100,
                              "cache.capacity_experts": 16 * 64, "workload.decode_tokens": 40}))
    starts, start = [], sim.stream._start_prefetch  # noqa: SLF001

    def record(memory, key, target_step, target_layer, step, layer, time):
        starts.append((target_step, target_layer, key % sim.workload.num_experts))
        start(memory, key, target_step, target_layer, step, layer, time)

    sim.stream._start_prefetch = record  # noqa: SLF001
    p = sim.run().summary["prefetch"]
    assert sum(m.hbm.stats.evictions for m in sim.memories) == 0
    steps = sim.workload.steps
    on_target = sum(expert in steps[s].experts[layer].tolist() for s, layer, expert in starts)
    assert p["issued"] == len(starts) and p["on_target"] == on_target
    assert 0 < p["on_target"] < p["useful"] < p["issued"]
    assert p["on_target_accuracy"] == pytest.approx(on_target / len(starts))
    oracle = Simulation(small(**{"prefetch.policy": "oracle", "prefetch.max_queued": 100})).run().summary["prefetch"]
    assert oracle["on_target"] == oracle["useful"] == oracle["issued"] > 0


# ------------------------------------------------------------------------------------------ each prefetcher


class _Step:
    def __init__(self, experts, predicted=None):
        self.experts = experts
        if predicted is not None:
            self.predicted_experts = predicted


class _Workload:
    def __init__(self, steps, embeddings=None):
        self.steps, self.embeddings, self.source = steps, embeddings, "fake"


def _context(workload=None, layers=4, experts=16, k=2, lookahead=1, budget=8):
    return PrefetchContext(layers, experts, k, lookahead, budget, workload)


def _event(step, layer, row, sequence=0, scores=None):
    row = np.asarray(row)
    scores = np.full(len(row), 1.0 / len(row)) if scores is None else np.asarray(scores)
    return RoutingEvent(step, layer, row, scores, row[None, :], np.array([sequence]))


def test_oracle_replaces_the_requested_share_deterministically():
    truth = [np.arange(l * 2, l * 2 + 8) % 64 for l in range(4)]
    context = _context(_Workload([_Step(truth)]), experts=64, k=8, lookahead=3)
    exact = make_prefetcher("oracle", {}, context).on_routing(_event(0, 0, truth[0]))
    assert exact == [(l, e) for l in (1, 2, 3) for e in truth[l].tolist()]
    noisy = make_prefetcher("oracle", {"accuracy": 0.25, "seed": 1}, context)
    first = noisy.on_routing(_event(0, 0, truth[0]))
    assert first == noisy.on_routing(_event(0, 0, truth[0]))  # a function of (seed, step, layer)
    right = sum(e in set(truth[l].tolist()) for l, e in first)
    assert 3 <= right <= 9  # about a quarter of 24 true experts kept
    assert all(len({e for l, e in first if l == layer}) == 8 for layer in (1, 2, 3))  # no repeats


def test_oracle_guesses_follow_the_scenario_seed_unless_given_their_own():
    """A sweep's per-point seeds (or a seed axis) vary the wrong guesses; prefetch.params.seed pins them."""
    import attrs

    truth = [np.arange(l * 2, l * 2 + 8) % 64 for l in range(4)]
    base = _context(_Workload([_Step(truth)]), experts=64, k=8, lookahead=3)

    def guesses(scenario_seed, params):
        context = attrs.evolve(base, seed=scenario_seed)
        return make_prefetcher("oracle", {"accuracy": 0.25, **params}, context).on_routing(_event(0, 0, truth[0]))

    assert guesses(0, {}) == guesses(5, {"seed": 0}) == guesses(0, {"seed": 0})  # the default seed is the scenario's
    assert guesses(0, {}) != guesses(5, {}) and guesses(5, {}) == guesses(7, {"seed": 5})
    assert guesses(5, {"seed": 9}) == guesses(6, {"seed": 9})


def test_oracle_wrong_guesses_are_bounded_by_the_experts_a_layer_does_not_use():
    """A layer using 6 of 8 experts has 2 unused ones: at accuracy 0 two guesses are wrong and 2 x 6 - 8 = 4 true
    ones stay; using all 8, every guess is right."""
    truth = [np.arange(6), np.arange(8)]
    context = _context(_Workload([_Step(truth)]), layers=2, experts=8, k=6, lookahead=1)
    oracle = make_prefetcher("oracle", {"accuracy": 0.0, "seed": 5}, context)
    guesses = [e for _, e in oracle.on_routing(_event(0, 0, truth[0]))]
    assert sorted(guesses) == list(range(8))  # layer 1 uses all 8 experts: every guess is true at accuracy 0
    assert sum(e < 6 for e in oracle._guesses(truth[0], 0, 1)) == 4  # noqa: SLF001


def test_oracle_without_the_workload_is_an_error():
    with pytest.raises(TierflowError, match="oracle"):
        make_prefetcher("oracle", {}, _context(None))


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(TierflowError, match="valid: capacity, neighbors"):
        PREFETCHERS.params("expert_map", {"size": 3})
    with pytest.raises(TierflowError, match="accuracy must be in"):
        PREFETCHERS.params("oracle", {"accuracy": 1.5})


def test_linear_map_recovers_a_deterministic_layer_to_layer_rule():
    """If expert e at layer l always leads to expert (e + 1) % E at layer l+1, the fitted map says so."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, 16, size=400)
    experts = np.stack([(first + layer) % 16 for layer in range(4)], axis=1)[:, :, None]  # (n, 4, 1)
    weights = np.ones(experts.shape, np.float32)
    hot, scored, _, bias = fit_layer_maps(experts, weights, 16, 2, ridge=0.1)
    for e in range(16):
        one_ahead = bias[0] + hot[0, e] + scored[0, e]
        assert int(np.argmax(one_ahead[:16])) == (e + 1) % 16
        assert int(np.argmax(one_ahead[16:])) == (e + 2) % 16


def test_linear_map_fits_with_a_ridge_lost_in_rounding():
    """A ridge far below the co-occurrence counts leaves the normal equations singular in floating point (here
    every router weight is 1, so each expert's one-hot and weight columns are the same): the fit still finds the
    rule, as the least-squares solution the ridge fit tends to."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, 16, size=400)
    experts = np.stack([(first + layer) % 16 for layer in range(4)], axis=1)[:, :, None]  # (n, 4, 1)
    weights = np.ones(experts.shape, np.float32)
    hot, scored, _, bias = fit_layer_maps(experts, weights, 16, 2, ridge=1e-20)
    assert all(np.isfinite(array).all() for array in (hot, scored, bias))
    for e in range(16):
        one_ahead = bias[0] + hot[0, e] + scored[0, e]
        assert int(np.argmax(one_ahead[:16])) == (e + 1) % 16
        assert int(np.argmax(one_ahead[16:])) == (e + 2) % 16


def test_linear_maps_counted_in_blocks_of_tokens_are_the_maps_counted_at_once(monkeypatch):
    """The normal equations are assembled a block of tokens at a time when the pairs would not fit one block; the
    counts, so the maps, are the same (up to the order of float additions) as when they are counted at once."""
    import tierflow.prefetch.speculative_gate as gate

    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(16)[:3] for _ in range(300 * 5)]).reshape(300, 5, 3)
    weights = rng.random(experts.shape).astype(np.float32)
    at_once = fit_layer_maps(experts, weights, 16, 2, ridge=0.5, history=3)
    monkeypatch.setattr(gate, "_PAIRS_PER_BLOCK", 1000)  # blocks of 1000 // (10 x 10) = 10 tokens
    for blocked, whole in zip(fit_layer_maps(experts, weights, 16, 2, ridge=0.5, history=3), at_once, strict=True):
        np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    assert np.abs(at_once[0]).max() > 0.01  # the maps are not all zero


@pytest.mark.parametrize(("experts", "history", "refused"), [(256, 15, False), (256, 16, True), (64, 16, False)])
def test_a_history_whose_fit_would_take_hours_is_refused(experts, history, refused):
    """Each layer's fit solves a dense system of (1 + history) x experts + 1 unknowns; above 4,097 (DeepSeek-R1's
    256 experts with history 16: 4,353) it is refused up front, in one line, with the largest history allowed."""
    context = PrefetchContext(58 if experts == 256 else 16, experts, 8, 2, 8)
    params = PREFETCHERS.params("speculative_gate", {"history": history})
    if refused:
        with pytest.raises(TierflowError, match=r"history = 16 fits each layer's maps with 4,353 unknowns .*"
                                                r"at most 4,097 \(history <= 15 here\)"):
            PREFETCHERS.get("speculative_gate").check(params, context)
    else:
        PREFETCHERS.get("speculative_gate").check(params, context)


def test_speculative_gate_with_a_tiny_ridge_simulates():
    scenario = scenario_with(SMALL, **{"prefetch.policy": "speculative_gate", "prefetch.params": {"ridge": 1e-20}})
    results = Simulation(scenario).run()
    assert results.summary["prefetch"]["issued"] > 0


def test_speculative_gate_watches_then_predicts_the_learned_rule():
    steps = [_Step([np.array([s % 16, (s + 5) % 16]) + 0 for _ in range(4)]) for s in range(8)]
    context = _context(_Workload(steps), lookahead=1)
    gate = make_prefetcher("speculative_gate", {"train_fraction": 0.5, "ridge": 0.01, "min_probability": 0.5},
                           context)
    for step in range(4):  # the training split: watched, nothing proposed
        for layer in range(4):
            assert gate.on_routing(_event(step, layer, [step % 16, (step + 5) % 16])) == []
    # Every layer repeats the previous one's experts in this toy routing; (1, 6) was seen in training.
    proposals = gate.on_routing(_event(4, 0, [1, 6]))
    assert sorted(proposals) == [(1, 1), (1, 6)]


def test_speculative_gate_prefers_recorded_predictions():
    steps = [_Step([np.array([0, 1])] * 4, predicted=np.zeros((1, 4, 2), np.int64))]
    gate = make_prefetcher("speculative_gate", {"train_fraction": 0.0}, _context(_Workload(steps)))
    event = attrs.evolve(_event(0, 0, [0, 1]), predicted=np.array([[7, 3]]))
    assert gate.on_routing(event) == [(1, 7), (1, 3)]  # no fit needed
    assert gate.on_routing(attrs.evolve(_event(0, 3, [0, 1]), predicted=np.array([[7, 3]]))) == []  # last layer
    # Nothing to fit on and told not to use the recordings: it would never propose anything.
    for params, workload in (({"train_fraction": 0.0, "use_recorded": False}, _Workload(steps)),
                             ({"train_fraction": 0.0}, _Workload([_Step([np.array([0, 1])] * 4)]))):
        with pytest.raises(TierflowError, match="train_fraction = 0.0 watches no step"):
            make_prefetcher("speculative_gate", params, _context(workload))
    # ... or watching every step: the maps would be fitted after the run.
    with pytest.raises(TierflowError, match=r"train_fraction = 1.0 watches all 3 decode step\(s\)"):
        make_prefetcher("speculative_gate", {"train_fraction": 1.0},
                        _context(_Workload([_Step([np.array([0, 1])] * 4)] * 3)))
    # A fraction below 1 leaves the last step to predict (ceil(0.9 x 8) would be all 8), and one step is too few.
    eight = make_prefetcher("speculative_gate", {"train_fraction": 0.9},
                            _context(_Workload([_Step([np.array([0, 1])] * 4)] * 8)))
    assert eight._watch_steps == 7  # noqa: SLF001
    hundred = make_prefetcher("speculative_gate", {"train_fraction": 0.55},
                              _context(_Workload([_Step([np.array([0, 1])] * 4)] * 100)))
    assert hundred._watch_steps == 55  # noqa: SLF001 - 0.55 x 100 is 55.000000000000007 in floating point
    with pytest.raises(TierflowError, match="a run of one decode step leaves nothing to predict"):
        make_prefetcher("speculative_gate", {"train_fraction": 0.5},
                        _context(_Workload([_Step([np.array([0, 1])] * 4)])))


def test_speculative_gate_offers_a_batchs_common_recorded_predictions_first():
    """The engine starts a budget's worth: the experts most tokens predicted come first, then first-seen order."""
    steps = [_Step([np.array([0, 1])] * 4, predicted=np.zeros((4, 4, 2), np.int64))]
    gate = make_prefetcher("speculative_gate", {"train_fraction": 0.0}, _context(_Workload(steps)))
    rows = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    event = attrs.evolve(_event(0, 0, [0, 1]), rows=rows, sequence_ids=np.arange(4),
                         predicted=np.array([[9, 10], [11, 12], [11, 13], [11, 10]]))
    assert gate.on_routing(event) == [(1, 11), (1, 10), (1, 9), (1, 12), (1, 13)]


def test_recorded_predictions_flow_from_the_trace_file_to_the_prefetcher(tmp_path):
    """A trace whose predicted_experts are the true next-layer experts: every prefetch is used, and the run
    stalls less than without prefetching."""
    rng = np.random.default_rng(3)
    tokens, layers, k = 24, 16, 8
    experts = np.stack([[rng.choice(64, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    predicted = np.roll(experts, -1, axis=1)  # row [t, l] = the experts of layer l + 1
    scores = -np.sort(-rng.dirichlet(np.ones(k), size=(tokens, layers)), axis=2).astype(np.float32)  # descending
    path = tmp_path / "predicted.h5"
    write_trace(path, experts, np.zeros(tokens, np.int64), model="olmoe-1b-7b", num_experts=64, source="test",
                gate_scores=scores, predicted_experts=predicted, validate=True)
    common = {"workload.trace": str(path), "workload.batch_size": 1, "workload.decode_tokens": tokens,
              "prefetch.lookahead": 1, "prefetch.max_queued": 64, "prefetch.budget_experts": 8}
    _, none, _, _ = run_recorded(small(**common, **{"prefetch.policy": "none"}))
    sim, gate, _, _ = run_recorded(small(**common, **{"prefetch.policy": "speculative_gate",
                                                     "prefetch.params": {"train_fraction": 0.0}}))
    step = sim.workload.steps[5]
    assert sim.workload.has_predictions and not Simulation(small()).workload.has_predictions
    assert np.array_equal(step.predicted_experts, predicted[5][None])
    assert np.allclose(step.row_scores, scores[5][None], atol=1e-3)  # stored as float16
    p = gate.summary["prefetch"]
    assert p["issued"] > 0 and p["accuracy"] == 1.0 and p["wasted_bytes"] == 0
    assert gate.summary["stall_s_per_token"] < none.summary["stall_s_per_token"]


def test_speculative_gate_refuses_a_training_split_that_overlaps_the_run(tmp_path):
    path = tmp_path / "t.h5"
    with TraceWriter(path, model="m", num_layers=4, num_experts=16, top_k=2, source="fake") as writer:
        writer.append(np.tile(np.array([0, 1]), (6, 4, 1)), np.array([0, 0, 0, 1, 1, 1]))
    # Routed unlike any training token: refused for its sequence id, the file being the workload's source.
    steps = [type("S", (), {"sequence_ids": np.array([1]), "experts": None,
                            "rows": np.tile(np.array([2, 3]), (1, 4, 1))})()]
    with pytest.raises(TierflowError, match="shares 1 sequence"):
        make_prefetcher("speculative_gate", {"train_trace": str(path)}, _context(_Workload(steps)))


@pytest.mark.parametrize("name", ["speculative_gate", "expert_map"])
def test_a_training_file_holding_the_runs_tokens_is_refused_whatever_its_name_for_them(tmp_path, name):
    """The built-in workload and a `trace gen` file of the same seed hold the same sequences under another
    source string: the tokens are compared, not their file's label. A file of another seed trains."""
    from tierflow.trace.synth import generate
    from tierflow.workload import synthetic_sequence_count, synthetic_token_count

    run = {"workload.batch_size": 1, "workload.decode_tokens": 16, "prefetch.policy": name}
    scenario = small(**run)
    tokens = synthetic_token_count(1, 16, 0, scenario.workload.synthetic_sequences)
    sequences = synthetic_sequence_count(1, scenario.workload.synthetic_sequences)
    for seed in (scenario.seed, scenario.seed + 1):
        generate("olmoe-1b-7b", tokens, tmp_path / f"{seed}.h5", sequences=sequences, seed=seed, workers=1)
    with pytest.raises(TierflowError, match=r"shares 1 sequence\(s\) with the simulated decode steps"):
        Simulation(small(**run, **{"prefetch.params": {"train_trace": str(tmp_path / f"{scenario.seed}.h5")}}))
    Simulation(small(**run, **{"prefetch.params": {"train_trace": str(tmp_path / f"{scenario.seed + 1}.h5")}}))


def test_token_keys_ignore_order_within_a_row_and_tell_tokens_apart():
    from tierflow.prefetch.training import token_keys

    rows = np.random.default_rng(0).integers(0, 256, size=(1000, 58, 8))
    keys = token_keys(rows)
    assert len(np.unique(keys)) == len(np.unique(rows.reshape(1000, -1), axis=0))
    assert np.array_equal(token_keys(rows[:, :, ::-1]), keys)
    changed = rows.copy()
    changed[:, 57, 7] = (changed[:, 57, 7] + 1) % 256  # one expert of the last layer
    assert not np.isin(token_keys(changed), keys).any()


def _walk(prefetcher, step, rows, sequence=0):
    """Feed one token through all layers; returns the proposals made at each layer."""
    return [prefetcher.on_routing(_event(step, layer, row, sequence)) for layer, row in enumerate(rows)]


def test_expert_map_matches_the_trajectory_and_proposes_what_the_match_used_next():
    pattern_a = [[0, 1], [2, 3], [4, 5], [6, 7]]
    pattern_b = [[0, 1], [8, 9], [10, 11], [12, 13]]
    em = make_prefetcher("expert_map", {"neighbors": 1, "semantic_weight": 0}, _context(_Workload([]), lookahead=1))
    assert isinstance(em, ExpertMap)
    _walk(em, 0, pattern_a)
    _walk(em, 1, pattern_b)
    proposals = _walk(em, 2, [[0, 1], [8, 9], [10, 11], [12, 13]])
    # At layer 1 the trajectory (0,1),(8,9) matches pattern B exactly: similarity 1, so only its top-k.
    assert sorted(proposals[1]) == [(2, 10), (2, 11)]
    assert sorted(proposals[2]) == [(3, 12), (3, 13)]


def test_expert_map_embedding_guides_the_first_layer():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    em = make_prefetcher("expert_map", {"neighbors": 1, "semantic_weight": 10},
                         _context(_Workload([], embeddings), lookahead=1))
    _walk(em, 0, [[0, 1], [2, 3], [4, 5], [6, 7]], sequence=0)
    _walk(em, 1, [[0, 1], [8, 9], [10, 11], [12, 13]], sequence=1)
    # Same first layer for both: the embedding (sequence 2 is close to sequence 0) decides.
    assert sorted(em.on_routing(_event(2, 0, [0, 1], sequence=2))) == [(1, 2), (1, 3)]


def test_expert_map_store_is_bounded_and_replaces_the_most_redundant_entry():
    em = make_prefetcher("expert_map", {"capacity": 2, "semantic_weight": 0}, _context(_Workload([])))
    a = [[0, 1], [2, 3], [4, 5], [6, 7]]
    b = [[8, 9], [10, 11], [12, 13], [14, 15]]
    a_variant = [[0, 1], [2, 3], [4, 5], [6, 9]]
    for step, rows in enumerate([a, b, a_variant]):
        _walk(em, step, rows)
    assert em._size == 2  # noqa: SLF001
    stored = {tuple(map(tuple, em._slot_experts[slot].tolist())) for slot in range(2)}  # noqa: SLF001
    assert stored == {tuple(map(tuple, a_variant)), tuple(map(tuple, b))}  # a was replaced, b kept


def test_expert_map_a_batch_that_fills_a_full_store_compares_with_what_it_just_stored():
    """Store A, B; one batch-2 step X, Y: X replaces A (its most similar), then Y must be compared with X, not
    with the A it overwrote: the store ends as the same tokens at batch 1 leave it."""
    a, b = [[0, 1]] * 4, [[1, 4]] * 4
    x, y = [[0, 2]] * 4, [[1, 5]] * 4
    scores = np.array([[0.5, 0.5], [0.7, 0.3]], np.float32)
    one_by_one = _expert_map_with([a, b], capacity=2)
    for step, (rows, row_scores) in enumerate(((x, scores[0]), (y, scores[1]))):
        for layer in range(4):
            event = attrs.evolve(_batch_event(2 + step, layer, [rows[layer]]), row_scores=row_scores[None, :])
            one_by_one.on_routing(event)
    batched = _expert_map_with([a, b], capacity=2)
    for layer in range(4):
        batched.on_routing(attrs.evolve(_batch_event(2, layer, [x[layer], y[layer]]), row_scores=scores))

    def store(em):
        return sorted(tuple(em._slot_experts[slot][0].tolist()) for slot in range(2))  # noqa: SLF001

    assert store(batched) == store(one_by_one) == [(0, 2), (1, 5)]
    # The patched similarities are the full computation's, slot by slot.
    rng = np.random.default_rng(0)
    em = _expert_map_with([[rng.choice(16, 2, replace=False).tolist() for _ in range(4)] for _ in range(6)],
                          capacity=6)
    experts, weights = np.array([[3, 7]] * 4), rng.random((4, 2)).astype(np.float32)
    np.testing.assert_allclose(em._full_similarity(experts, weights, [1, 4]),  # noqa: SLF001
                               em._full_similarity(experts, weights)[[1, 4]], rtol=1e-6)  # noqa: SLF001


def _batch_event(step, layer, rows, sequences=None):
    rows = np.asarray(rows)
    experts = np.unique(rows)
    sequences = np.arange(len(rows)) if sequences is None else np.asarray(sequences)
    return RoutingEvent(step, layer, experts, np.full(len(experts), 0.5), rows, sequences)


def _expert_map_with(maps, **params):
    """An expert map whose store holds ``maps`` (each a list of per-layer rows), trajectory matching only."""
    em = make_prefetcher("expert_map", {"semantic_weight": 0, **params}, _context(_Workload([])))
    for step, rows in enumerate(maps):
        _walk(em, step, rows)
    return em


def test_expert_map_cumulative_selection_takes_router_weight_until_one_minus_similarity():
    """FineMoE's rule: experts by the neighbours' router weight until the cumulative weight reaches 1 -
    similarity, at least top_k (2 here)."""
    em = make_prefetcher("expert_map", {"selection": "cumulative", "capacity": 2}, _context(_Workload([])))
    em._maps[1, [4, 5, 6], 0] = [0.5, 0.25, 0.25]  # noqa: SLF001 - two stored maps' layer 1, exact in float16
    em._maps[1, 7, 1] = 1.0  # noqa: SLF001
    nearest, vote = np.array([[0, 1]]), np.array([[0.5, 0.5]])  # weights at layer 1: 7 .5, 4 .25, 5 .125, 6 .125

    def chosen(*targets):
        rows = np.repeat(nearest, len(targets), axis=0), np.repeat(vote, len(targets), axis=0)
        return [e for _, e in em._cumulative(0, 1, *rows, np.array(targets))]  # noqa: SLF001

    assert chosen(0.0) == [7, 4]  # a perfect match: top_k
    assert chosen(0.75) == [7, 4]
    assert chosen(0.76) == [7, 4, 5]
    assert chosen(0.9) == [7, 4, 5, 6]
    assert chosen(0.0, 0.9) == [7, 4, 5, 6]  # a batch: the union, heaviest first
    # End to end: a token that repeats a stored map exactly (similarity 1) gets that map's top_k next experts.
    one = _expert_map_with([[[0, 1], [4, 5], [8, 9], [10, 11]]], selection="cumulative", neighbors=1)
    assert one.on_routing(_event(1, 0, [0, 1])) == [(1, 4), (1, 5)]
    with pytest.raises(TierflowError, match="'selection' must be in"):
        PREFETCHERS.params("expert_map", {"selection": "topk"})


def test_expert_map_proposes_the_experts_enough_of_the_neighbours_used():
    """Four stored maps match the token equally at layer 0; at layer 1 three used expert 4, one expert 6, and
    all used 5. The estimated probability of use is the share of neighbours: 5 -> 1, 4 -> 3/4, 6 -> 1/4."""
    maps = [[[0, 1], [4, 5], [8, 9], [10, 11]]] * 3 + [[[0, 1], [5, 6], [8, 9], [10, 11]]]
    def proposals(threshold):
        em = _expert_map_with(maps, neighbors=4, selection="threshold", min_probability=threshold)
        return em.on_routing(_event(9, 0, [0, 1]))

    assert proposals(0.3) == [(1, 5), (1, 4)]
    assert proposals(0.25) == [(1, 5), (1, 4), (1, 6)]
    assert proposals(1.0) == [(1, 5)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0))
def test_expert_map_a_higher_threshold_proposes_a_prefix_of_the_same_list(seed, low, high):
    """Raising min_probability only drops the least likely proposals: the list is a prefix of the lower one's,
    per layer ahead (a monotone accuracy-for-coverage trade)."""
    low, high = sorted((low, high))
    rng = np.random.default_rng(seed)
    maps = [[rng.choice(16, 2, replace=False).tolist() for _ in range(4)] for _ in range(12)]
    token = [rng.choice(16, 2, replace=False).tolist() for _ in range(4)]
    walks = []
    for threshold in (low, high):
        em = make_prefetcher("expert_map", {"semantic_weight": 0, "neighbors": 5, "selection": "threshold",
                                            "min_probability": threshold},
                             _context(_Workload([]), lookahead=2))
        for step, rows in enumerate(maps):
            _walk(em, step, rows)
        walks.append(_walk(em, 99, token))
    for wide, narrow in zip(*walks, strict=True):
        for target in {layer for layer, _ in wide}:
            wide_list = [e for layer, e in wide if layer == target]
            narrow_list = [e for layer, e in narrow if layer == target]
            assert wide_list[:len(narrow_list)] == narrow_list


@pytest.mark.parametrize("seed", range(3))
def test_expert_map_batch_proposes_what_some_token_alone_would(seed):
    """A batch proposes an expert when one of its tokens needs it with at least min_probability (the
    union of the tokens' own proposals), not when many weak estimates add up."""
    rng = np.random.default_rng(seed)
    maps = [[rng.choice(16, 2, replace=False).tolist() for _ in range(4)] for _ in range(20)]
    tokens = [rng.choice(16, 2, replace=False) for _ in range(3)]
    alone = set()
    for token in tokens:
        em = _expert_map_with(maps, neighbors=6, selection="threshold", min_probability=0.3)
        alone |= set(em.on_routing(_event(50, 0, token)))
    em = _expert_map_with(maps, neighbors=6, selection="threshold", min_probability=0.3)
    together = em.on_routing(_batch_event(50, 0, np.stack(tokens)))
    assert len(together) == len(set(together)) and set(together) == alone


def test_linear_map_with_history_recovers_a_rule_one_layer_back():
    """Layer l+1 repeats layer l-1's expert and layer l is noise: one layer of routing cannot tell which
    expert comes next, two layers can."""
    rng = np.random.default_rng(1)
    n, E = 2000, 8
    first = rng.integers(0, E, n)
    experts = np.stack([first, rng.integers(0, E, n), first, rng.integers(0, E, n)], axis=1)[:, :, None]
    weights = np.ones(experts.shape, np.float32)
    hot, scored, past, bias = fit_layer_maps(experts, weights, E, 1, ridge=0.1, history=2)
    one_hot, one_scored, one_past, one_bias = fit_layer_maps(experts, weights, E, 1, ridge=0.1, history=1)
    assert past.shape == (4, 1, E, E) and one_past.shape == (4, 0, E, E)
    for y in range(E):
        for x in range(E):
            with_history = bias[1] + hot[1, x] + scored[1, x] + past[1, 0, y]
            assert int(np.argmax(with_history)) == y and with_history[y] > 0.9
            without = one_bias[1] + one_hot[1, x] + one_scored[1, x]
            assert without.max() < 0.3  # about 1/8 each: layer 1 says nothing about layer 2
    assert not past[0].any()  # layer 0 has no layer before it


def test_speculative_gate_with_history_reads_the_earlier_layers_of_the_same_step():
    """Layer 2 repeats layer 0's expert and layer 1 is noise: with history 2 the gate, at layer 1, proposes
    layer 0's expert for layer 2; from layer 0 alone it has nothing to go on for layer 1."""
    rng = np.random.default_rng(2)
    pairs = zip(rng.integers(0, 16, 256).tolist(), rng.integers(0, 16, 256).tolist(), strict=True)
    rows = [[a, b, a, b] for a, b in pairs]
    steps = [_Step([np.array([e]) for e in r]) for r in rows]
    gate = make_prefetcher("speculative_gate", {"train_fraction": 0.5, "ridge": 0.01, "min_probability": 0.5,
                                                "history": 2}, _context(_Workload(steps), k=1))
    for step in range(128):  # the watched half
        for layer, e in enumerate(rows[step]):
            assert gate.on_routing(_event(step, layer, [e])) == []
    for step in range(128, 136):
        first, noise = rows[step][:2]
        assert gate.on_routing(_event(step, 0, [first])) == []
        assert gate.on_routing(_event(step, 1, [noise])) == [(2, first)]


def test_transition_proposes_what_most_often_followed_the_routed_experts():
    transition = make_prefetcher("transition", {"min_observations": 3}, _context(lookahead=2, budget=2))
    # Expert 0 at layer 0 is followed at layer 1 by 5, 6, 5 and always by 7; at layer 2 by 9 always, 8 twice.
    for step, (one_ahead, two_ahead) in enumerate([(5, 8), (6, 8), (5, 10)]):
        assert _walk(transition, step, [[0, 1], [one_ahead, 7], [9, two_ahead], [3, 4]]) == [[]] * 4
    # Six experts followed expert 0 at each distance: 7 in 3 of 6, 5 in 2, 6 in 1; 9 in 3, 8 in 2, 10 in 1.
    assert transition.on_routing(_event(3, 0, [0])) == [(1, 7), (1, 5), (2, 9), (2, 8)]


def _transition_reference(context, events):
    """The rule in its plainest form: update each token's counts at each event, then rank (as the prefetcher
    did before it counted a step's transitions all at once)."""
    n, a = context.num_experts, context.lookahead
    counts = np.zeros((context.num_layers, a, n, n), np.float32)
    totals = np.zeros((context.num_layers, a, n), np.float32)
    prob = np.zeros_like(counts)
    routed, step, seen, out = {}, -1, 0, []
    for event in events:
        if event.step != step:
            step, routed, seen = event.step, {}, seen + 1
        experts, layer = event.experts, event.layer
        for d in range(1, a + 1):
            sources = routed.get(layer - d)
            for source, target in zip(sources if sources is not None else [], event.rows, strict=False):
                counts[layer - d, d - 1][source[:, None], target[None, :]] += 1
                totals[layer - d, d - 1][source] += len(target)
                table = prob[layer - d, d - 1]
                table[source] = counts[layer - d, d - 1][source] / totals[layer - d, d - 1][source][:, None]
        routed[layer] = event.rows
        reach = min(a, context.num_layers - 1 - layer)
        proposals = []
        if seen > 1 and reach > 0:
            budget = min(context.budget_experts, n)
            for d in range(reach):
                scores = prob[layer, d][experts].sum(axis=0)
                best = np.argsort(-scores, kind="stable")[:budget]  # equal scores: the lower expert id first
                proposals += [(layer + 1 + d, e) for e in best[scores[best] > 0].tolist()]
        out.append(proposals)
    return out


def _random_batch_event(rng, step, layer, batch, experts=12):
    width = int(rng.integers(1, 5))
    rows = np.array([rng.choice(experts, size=width, replace=False) for _ in range(batch)])
    return attrs.evolve(_batch_event(step, layer, rows), experts=_first_seen(rows))


def _first_seen(rows):
    """A batch's distinct experts in first-seen order, as the engine gives them."""
    flat = rows.ravel()
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)]


@pytest.mark.parametrize("seed", range(6))
def test_transition_counting_a_step_at_once_proposes_as_counting_each_layer(seed):
    """Batch 1 (seeds 0-3) and batch 2-4 (4-5): per-token counts added a step at once rank as the reference."""
    rng = np.random.default_rng(seed)
    # Budgets from none to more than the 12 experts (then every expert with evidence is ranked).
    budget = (0, 1, 3, 5, 12, 20)[seed]
    context = _context(layers=6, experts=12, lookahead=int(rng.integers(1, 4)), budget=budget)
    batch = 1 if seed < 4 else int(rng.integers(2, 5))
    events = [_random_batch_event(rng, step, layer, batch) for step in range(30) for layer in range(6)]
    transition = make_prefetcher("transition", {"min_observations": 1}, context)
    assert [transition.on_routing(e) for e in events] == _transition_reference(context, events)


def test_prefetches_refused_for_a_full_queue_wait_and_start_when_it_drains():
    """With batch 4 and room for one queued read, most proposals meet a full SSD queue. They wait (a budget's
    worth per GPU) and start when a transfer leaves the queue, unless their layer has been reached."""
    scenario = small(**{"workload.batch_size": 4, "prefetch.policy": "oracle", "prefetch.max_queued": 1,
                        "prefetch.lookahead": 2, "prefetch.budget_experts": 8})
    dropped = Simulation(scenario)
    dropped.stream.deferred = [deque(maxlen=0) for _ in dropped.memories]  # the former rule: refused is dropped
    issued_without = dropped.run().summary["prefetch"]["issued"]

    sim = Simulation(scenario)
    stream, started = sim.stream, []
    start = stream._start_prefetch  # noqa: SLF001

    def record(memory, key, target_step, target_layer, step, layer, time):
        assert target_step == step + (target_layer <= layer)  # a target at or before this layer: the next step's
        started.append((stream.position, (target_step, target_layer), sim.calendar.now > sim.env.now))
        start(memory, key, target_step, target_layer, step, layer, time)

    stream._start_prefetch = record  # noqa: SLF001
    results = sim.run()
    assert results.summary["prefetch"]["issued"] == len(started) > issued_without
    assert all(target > position for position, target, _ in started)  # never for a layer already reached
    assert any(later for _, _, later in started)  # some started later, when a queue drained
    # ... among them proposals for the next step's first layers, kept while this step ran on
    assert any(later and target[0] > position[0] for position, target, later in started)
    assert all(target[0] < len(sim.workload.steps) for _, target, _ in started)  # none for a step the run lacks
    p = results.summary["prefetch"]
    assert p["wasted_bytes"] == (p["issued"] - p["useful"]) * sim.spec.expert_bytes


@pytest.mark.parametrize("name", ["speculative_gate", "expert_map"])
def test_training_trace_values_are_checked_and_errors_name_the_file_once(tmp_path, name):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(format="tierflow-trace", version=1, model="m", num_layers=4, num_experts=16, top_k=2,
                       source="fake")
        f["experts"] = np.tile(np.array([0, 16]), (6, 4, 1)).astype(np.uint8)  # id 16 is out of range
        f["sequence_id"] = np.zeros(6, dtype=np.int64)
    context = _context(_Workload([]))
    with pytest.raises(TierflowError) as error:
        make_prefetcher(name, {"train_trace": str(path)}, context)
    assert f"train_trace {path}: expert id 16 outside [0, 16)" in str(error.value)
    missing = tmp_path / "absent.h5"
    with pytest.raises(TierflowError) as error:
        make_prefetcher(name, {"train_trace": str(missing)}, context)
    assert str(error.value) == f"prefetcher {name!r}: train_trace {missing}: no such file"


def test_the_training_split_is_the_last_decode_tokens_and_a_trace_without_any_is_refused(tmp_path):
    """Prefill tokens at the end of the file do not count toward ``train_tokens``; a file of prefill only is an
    error, as an empty one is (it used to fit on nothing and never prefetch)."""
    experts = np.stack([np.tile(np.array([t % 16, (t + 1) % 16]), (4, 1)) for t in range(10)])
    phase = np.array([0, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=np.uint8)  # decode tokens 1..6, then prefill
    path = tmp_path / "mixed.h5"
    write_trace(path, experts, np.arange(10) // 5, phase=phase, model="m", num_experts=16, source="mixed")
    split = load_training_split(str(path), 4, _context(_Workload([])), "speculative_gate")
    assert split.experts.tolist() == experts[3:7].tolist()  # the last 4 decode tokens, not tokens 6..9
    prefill = tmp_path / "prefill.h5"
    write_trace(prefill, experts, np.zeros(10, dtype=np.int64), phase=np.zeros(10, dtype=np.uint8), model="m",
                num_experts=16, source="prefill")
    for name in ("speculative_gate", "expert_map"):
        with pytest.raises(TierflowError, match="has no decode tokens"):
            make_prefetcher(name, {"train_trace": str(prefill)}, _context(_Workload([])))
    # A bad phase value before the split is still an error (the split's start is placed by reading every phase).
    bad = tmp_path / "bad_phase.h5"
    write_trace(bad, experts, np.zeros(10, dtype=np.int64), phase=np.r_[np.uint8(7), np.ones(9, np.uint8)],
                model="m", num_experts=16, source="bad")
    with pytest.raises(TierflowError, match="phase values must be 0"):
        load_training_split(str(bad), 4, _context(_Workload([])), "speculative_gate")


def test_a_prefetch_from_the_ddr_cache_waits_for_the_host_link_not_the_drive():
    """Three tiers: an expert the DDR cache holds would be read over the host link, so a busy drive queue does not
    hold its prefetch back; one that must come from the SSD waits for the drive."""
    sim = Simulation(load_scenario("three_tier", ["workload.decode_tokens=1", "prefetch.policy=oracle"]))
    memory = sim.memories[0]
    gpus, experts = sim.plan.gpus, sim.workload.num_experts
    in_ddr, on_ssd = [key for key in range(0, 10 * experts, gpus) if key not in memory.resident][:2]
    memory.ddr.admit(in_ddr, sim.spec.expert_bytes, Access(in_ddr, 0))
    drive, link = memory.paths["ssd"].hops[0], memory.paths["ddr"].hops[0]
    drive._queue.append((0, 0, None))  # the drive has a read waiting
    assert memory.prefetch_source is drive and drive.queued == 1 and link.queued == 0
    assert memory.prefetch_blocker(in_ddr, 1) is None
    assert memory.prefetch_blocker(on_ssd, 1) == "queue"
    link._queue.append((0, 0, None))
    assert memory.prefetch_blocker(in_ddr, 1) == "queue"


def test_a_finemoe_ddr_cache_protects_a_prefetch_only_until_hbm_uses_it():
    """Three tiers: an expert prefetched from SSD is kept in the DDR cache on its way, as a prefetch (finemoe
    protects it). The DDR cache hears only HBM misses, so it must be told when HBM uses the expert: it stayed
    protected for good, and every expert a demand miss brought in was evicted before any prefetched one."""
    sim = Simulation(small(**{"workload.batch_size": 1, "workload.decode_tokens": 40, "cache.capacity_experts": 200,
                              "ddr_cache.enabled": True, "ddr_cache.policy": "finemoe",
                              "ddr_cache.capacity_experts": 400, "prefetch.policy": "oracle"}))
    memory = sim.memories[0]
    protected = memory.ddr.policy._protected
    demand, checked = memory.demand, []

    def watched(key, access):
        first_use = key in memory._unused_prefetch
        transfer = demand(key, access)
        if first_use and key in memory.ddr:
            checked.append(key not in protected)
        return transfer

    memory.demand = watched
    sim.run()
    assert len(checked) > 100 and all(checked)
    assert len(protected & set(memory.ddr.keys())) < len(memory.ddr) / 4


def test_deferred_prefetches_from_the_ddr_cache_go_when_the_host_link_drains():
    """Three tiers: a deferred proposal whose expert the DDR cache holds starts when the host link's queue drains,
    even behind one still waiting for the drive (which keeps its place)."""
    sim = Simulation(load_scenario("three_tier", ["workload.decode_tokens=1", "prefetch.policy=oracle",
                                                  "prefetch.max_queued=1"]))
    stream, memory = sim.stream, sim.memories[0]
    gpus, experts = sim.plan.gpus, sim.workload.num_experts
    on_ssd, in_ddr = [key for key in range(0, 10 * experts, gpus) if key not in memory.resident][:2]
    memory.ddr.admit(in_ddr, sim.spec.expert_bytes, Access(in_ddr, 0))
    drive, link = memory.prefetch_source, memory.ddr_source
    assert link is not drive and link.dequeue_listeners  # the link re-offers deferred proposals too
    drive._queue.append((0, 0, None))  # the drive stays busy
    stream.deferred[0].extend([(on_ssd, 0, 3), (in_ddr, 0, 4)])
    stream._offer_deferred(0)
    assert in_ddr in memory.resident and on_ssd not in memory.resident
    assert list(stream.deferred[0]) == [(on_ssd, 0, 3)]


@pytest.mark.parametrize("policy, capacity", [("lfu", 160), ("belady", 256)])
def test_an_expert_stays_until_its_layers_compute_ends(policy, capacity, monkeypatch):
    """Prefetches deferred for a full queue start as it drains, possibly while a layer computes: none may
    evict an expert that layer is computing with (the data paths' events run when the stream catches up)."""
    from tierflow.sim import gpu

    sim = Simulation(small(**{
        "cache.capacity_experts": capacity, "cache.policy": policy, "workload.batch_size": 8,
        "workload.decode_tokens": 10, "workload.context_length": 64, "placement": "ssd",
        "ddr_cache.enabled": True, "ddr_cache.capacity_experts": 600, "prefetch.policy": "oracle",
        "prefetch.lookahead": 3, "prefetch.budget_experts": 24, "prefetch.max_queued": 1}))
    windows, layer_keys = {}, []
    demand, experts = gpu.GpuStream._demand, gpu.ComputeModel.experts

    def record_demand(stream, step, layer):
        waits, used = demand(stream, step, layer)
        layer_keys.append([key for _, key in used])
        return waits, used

    def record_experts(model, chosen, tokens):
        phase = experts(model, chosen, tokens)
        for key in layer_keys.pop(0):  # this layer's experts compute from now for phase.seconds
            windows[key] = (sim.env.now, sim.env.now + phase.seconds)
        return phase

    monkeypatch.setattr(gpu.GpuStream, "_demand", record_demand)
    monkeypatch.setattr(gpu.ComputeModel, "experts", record_experts)
    inside = []
    for memory in sim.memories:
        def evicted(key, memory=memory):
            start, end = windows.get(key, (0.0, 0.0))
            if start <= memory.calendar.now < end:
                inside.append((key, memory.calendar.now))
        memory.hbm.eviction_listeners.append(evicted)
    results = sim.run()
    assert results.summary["prefetch"]["issued"] > 0 and inside == []


def test_the_ddr_hit_rate_counts_demand_lookups_as_the_hbm_one_does():
    sim = Simulation(small(**{
        "cache.capacity_experts": 160, "workload.batch_size": 4, "workload.decode_tokens": 8, "placement": "ssd",
        "ddr_cache.enabled": True, "ddr_cache.capacity_experts": 800, "prefetch.policy": "oracle",
        "prefetch.params": {"accuracy": 0.5}, "prefetch.lookahead": 2, "prefetch.max_queued": 64}))
    lookups = {True: [], False: []}  # prefetch? -> hits
    for memory in sim.memories:
        lookup = memory.ddr.lookup

        def recorded(key, access, lookup=lookup):
            hit = lookup(key, access)
            lookups[bool(access.prefetch)].append(hit)
            return hit

        memory.ddr.lookup = recorded
    results = sim.run()
    demand = lookups[False]
    assert lookups[True] and results.summary["hit_rate"]["ddr"] == sum(demand) / len(demand)
    every = lookups[True] + demand
    assert sum(every) / len(every) != sum(demand) / len(demand)
