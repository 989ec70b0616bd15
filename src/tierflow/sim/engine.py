"""Builds the simulation of a scenario (environment, channels, caches, GPU stream), runs it, and returns results.

Capacity planning happens here, before anything runs: HBM holds the non-expert weights and the KV cache of
the batch first, and the expert cache gets what is left (or the scenario's explicit capacity, which must
fit). Bad or impossible settings are :class:`TierflowError` with one line naming the figures.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import simpy

from tierflow.cache import POLICIES, make_expert_cache
from tierflow.catalog import get_model, get_profile
from tierflow.catalog.hardware import HardwareProfile
from tierflow.catalog.models import ModelSpec
from tierflow.config import Scenario
from tierflow.energy import EnergyModel
from tierflow.errors import TierflowError
from tierflow.ledger import Ledger, Route
from tierflow.metrics import Results, collect_results
from tierflow.prefetch import PrefetchContext, Prefetcher, make_prefetcher
from tierflow.sim.calendar import Calendar
from tierflow.sim.dram import StagingBuffer
from tierflow.sim.gpu import ComputeModels, FutureIndex, GpuStream, attention_groups, kv_layout
from tierflow.sim.link import LinkChannel
from tierflow.sim.memory import ExpertMemory, FetchPath
from tierflow.sim.ssd import SsdChannel, sustained_read_bytes_per_s
from tierflow.workload import Workload, load_workload, synthetic_workload, uniform_workload

# Transfers are pipelined between hops in chunks of this size. [DER] assumption, not a measurement: a pinned
# staging slice of a few MiB, long enough that a chunk's per-copy overhead is small (4 MiB is 0.3 ms on a 13 GB/s
# drive), short enough that a pre-empted prefetch gives way quickly. It sets cut-through overlap and pre-emption.
TRANSFER_CHUNK_BYTES = 4 * 2**20
# Pinned host memory set aside per GPU for staging SSD reads when GPUDirect Storage is off (at most the DDR share).
# [DER] assumption, not a measurement: room for dozens of experts of every catalog model, so it binds only on a
# desktop (its 1 GB DDR share) or with experts of hundreds of MB (Mixtral's 352 MB: five at a time).
STAGING_BYTES_PER_GPU = 2 * 2**30


def staging_bytes(hardware: HardwareProfile) -> int:
    """The staging buffer of one GPU: :data:`STAGING_BYTES_PER_GPU`, or all of a smaller DDR share (a desktop with
    about 1 GB of free DRAM stages its reads there)."""
    return int(min(STAGING_BYTES_PER_GPU, hardware.ddr.capacity_bytes))


@attrs.frozen
class Plan:
    """Capacities per GPU, decided before the run."""

    gpus: int
    expert_bytes: int
    free_hbm_bytes: int  # after non-expert weights and the KV cache
    hbm_cache_experts: int | None  # None: no HBM expert cache (all resident, or caching disabled)
    ddr_cache_experts: int | None
    kv_bytes_per_gpu: int
    non_expert_bytes_per_gpu: int
    # The most distinct experts one layer of one step can ask of one GPU, known before the run: the batch's
    # tokens x top_k, at most the layer's experts that GPU holds.
    step_demand_bound: int
    layer_slots: tuple[int, ...] | None = None  # a per-layer HBM cache: each layer's slots per GPU


def check_routing_source(routing: str, trace) -> None:
    """Uniform routing draws its own experts: it takes no trace."""
    if routing == "uniform" and trace:
        raise TierflowError("workload.routing = 'uniform' draws its own routing; drop the trace or set "
                            "workload.routing = 'trace'")


def check_trace_shape(path, shape: tuple[int, int, int], spec: ModelSpec) -> None:
    """A trace's (MoE layers, experts, top_k) must be the scenario model's."""
    layers, experts, top_k = shape
    if (layers, experts) != (spec.num_moe_layers, spec.num_routed_experts):
        raise TierflowError(f"{path}: trace has {layers} MoE layers x {experts} experts but model {spec.name!r} has "
                            f"{spec.num_moe_layers} x {spec.num_routed_experts}; set `model` to match")
    if top_k != spec.top_k:
        raise TierflowError(f"{path}: trace has top_k {top_k} but model {spec.name!r} has top_k {spec.top_k}; set "
                            f"`model` to match")


def load_scenario_workload(scenario: Scenario, spec: ModelSpec, trace: str | None = None) -> Workload:
    workload_cfg = scenario.workload
    path = trace or workload_cfg.trace
    check_routing_source(workload_cfg.routing, path)
    if workload_cfg.routing == "uniform":
        return uniform_workload(spec.name, workload_cfg.batch_size, workload_cfg.decode_tokens, scenario.seed)
    if path:
        workload = load_workload(path, workload_cfg.batch_size, workload_cfg.decode_tokens, workload_cfg.skip_tokens)
        check_trace_shape(path, (workload.num_layers, workload.num_experts, workload.top_k), spec)
        return workload
    return synthetic_workload(spec.name, workload_cfg.batch_size, workload_cfg.decode_tokens,
                              workload_cfg.synthetic_sequences, scenario.seed, workload_cfg.skip_tokens)


def layer_experts(workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """Every step's layers' experts, compactly: the ids of all (step, layer) unions one after another, and each
    union's size (what :func:`layer_working_sets` needs, without the steps)."""
    layers = [experts for step in workload.steps for experts in step.experts]
    sizes = np.fromiter(map(len, layers), dtype=np.int64, count=len(layers))
    return np.concatenate(layers).astype(np.int32), sizes


def layer_working_sets(experts: tuple[np.ndarray, np.ndarray], gpus: int, num_layers: int) -> np.ndarray:
    """Each MoE layer's most distinct experts one GPU needs in one step (expert ``e`` lives on GPU ``e mod
    gpus``), from :func:`layer_experts`: counted for every (step, layer, GPU) at once."""
    ids, sizes = experts
    group = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    counts = np.bincount(group * gpus + ids % gpus, minlength=len(sizes) * gpus)
    return counts.reshape(-1, num_layers, gpus).max(axis=(0, 2))


def _hbm_budget(scenario: Scenario, spec: ModelSpec, hardware: HardwareProfile, steps: int) -> tuple[int, int, int]:
    """Per GPU: the KV cache of the batch over ``steps`` decode steps, the non-expert weights, and the HBM left
    for experts. Needs no workload, so it can run before one is built."""
    gpus = scenario.gpus
    if gpus > 1 and hardware.nvlink is None:
        raise TierflowError(f"gpus = {gpus} needs GPU-to-GPU links, and profile {hardware.name!r} has none")
    context = scenario.workload.context_length + steps
    # Attention runs in gpus / tp data-parallel groups: each holds a replica of the non-expert weights, split over
    # its tp GPUs, and the KV cache of its share of the batch, split as far as its heads allow (kv_layout).
    tp, _, group_batch = attention_groups(gpus, scenario.attention_tp, scenario.workload.batch_size)
    kv_share, kv_copies = kv_layout(spec, tp, scenario.kv_split)
    kv_per_gpu = math.ceil(spec.kv_bytes(context, group_batch) * kv_share)
    non_expert_per_gpu = math.ceil(spec.total_non_expert_bytes / tp)
    hbm_bytes = int(hardware.gpu.hbm.capacity_bytes)
    free = hbm_bytes - kv_per_gpu - non_expert_per_gpu
    if free < 0:
        raise TierflowError(
            f"HBM too small: {hbm_bytes / 1e9:.1f} GB per GPU cannot hold {non_expert_per_gpu / 1e9:.1f} GB of "
            f"non-expert weights and a {kv_per_gpu / 1e9:.1f} GB KV cache; "
            + ("use a smaller batch or a smaller attention_tp (a group's GPUs each keep the KV heads they attend "
               "with, so more, smaller groups hold fewer sequences each)" if kv_copies > 1 else
               "use a smaller batch, or a smaller model or another profile (this one has no GPU-to-GPU links)"
               if hardware.nvlink is None else "use more gpus or a smaller batch"))
    return kv_per_gpu, non_expert_per_gpu, free


def check_policies(scenario: Scenario) -> None:
    """Both caches' policy names and parameters, whether or not the run builds that cache (a wrong name or
    parameter is an error even where it would change nothing, as for the prefetcher)."""
    POLICIES.params(scenario.cache.policy, scenario.cache.params)
    try:
        POLICIES.params(scenario.ddr_cache.policy, scenario.ddr_cache.params)
    except TierflowError as error:
        raise TierflowError(f"ddr_cache: {error}") from None


def prefetch_lookahead(scenario: Scenario, num_layers: int) -> int:
    """Layers ahead a prefetch may target: as set, but no further than the last layer (a larger value changes
    nothing and would only size prefetchers' tables for layers that do not exist)."""
    return min(scenario.prefetch.lookahead, max(1, num_layers - 1))


def prefetch_context(scenario: Scenario, num_layers: int, num_experts: int, top_k: int,
                     workload: Workload | None = None) -> PrefetchContext:
    """What the scenario's prefetcher is built with (``workload``: None for a check that has no steps)."""
    return PrefetchContext(num_layers, num_experts, top_k, prefetch_lookahead(scenario, num_layers),
                           scenario.prefetch.budget_experts, workload, scenario.seed)


def check_hbm(scenario: Scenario, spec: ModelSpec, hardware: HardwareProfile) -> None:
    """The HBM check of :func:`plan_capacity` for the least KV cache any workload needs (one decode step), run
    before the workload is built: a batch whose KV cache cannot fit fails at once, whatever it would cost to
    build its steps."""
    _hbm_budget(scenario, spec, hardware, 1)


def plan_capacity(scenario: Scenario, spec: ModelSpec, hardware: HardwareProfile, workload: Workload | None,
                  steps: int | None = None, working_sets: np.ndarray | None = None) -> Plan:
    """Bytes per GPU for weights, KV cache and expert caches. The KV cache is sized for ``steps`` decode steps
    (default: the workload's), the caches' least size by the workload's layer working sets (or the per-layer
    ``working_sets`` of :func:`layer_working_sets` given instead of a workload)."""
    gpus = scenario.gpus
    expert_bytes = spec.expert_bytes
    steps = len(workload.steps) if steps is None else steps
    kv_per_gpu, non_expert_per_gpu, free = _hbm_budget(scenario, spec, hardware, steps)
    if working_sets is None:
        working_sets = layer_working_sets(layer_experts(workload), gpus, spec.num_moe_layers)
    working_set = int(working_sets.max())
    held = -(-spec.num_routed_experts // gpus)  # the experts of one layer that live on one GPU
    experts_per_gpu = held * spec.num_moe_layers
    hbm_cache = ddr_cache = layer_slots = None
    cache = scenario.cache
    if scenario.placement == "hbm":
        if experts_per_gpu * expert_bytes > free:
            raise TierflowError(
                f"placement = 'hbm' needs {experts_per_gpu * expert_bytes / 1e9:.1f} GB of experts per GPU but only "
                f"{free / 1e9:.1f} GB of HBM is free; use more gpus or placement = 'ddr' / 'ssd'"
            )
    elif scenario.timing.expert_copies == "ahead" and cache.enabled:
        raise TierflowError("timing.expert_copies = 'ahead' streams every expert at every step; set "
                            "cache.enabled = false (or timing.expert_copies = 'on_demand' to use the cache)")
    elif not cache.enabled and working_set * expert_bytes > free:  # a layer's experts are streamed into HBM
        raise TierflowError(
            f"one layer's working set of {working_set} experts per GPU needs {working_set * expert_bytes / 1e9:.1f} GB "
            f"of HBM but only {free / 1e9:.1f} GB is free after weights and KV cache; use a smaller batch or "
            f"context{'' if hardware.nvlink is None else ', or more gpus'}")
    elif cache.enabled and cache.layer_slots is not None:
        layer_slots = _layer_slots(cache.layer_slots, spec.name, held, gpus, working_sets)
        hbm_cache = sum(layer_slots)
        _check_cache_bytes(hbm_cache, expert_bytes, free, experts_per_gpu)
    elif cache.enabled:
        hbm_cache = _cache_experts(cache.capacity_experts, cache.capacity_bytes, gpus, expert_bytes,
                                   free // expert_bytes)
        _check_cache_bytes(hbm_cache, expert_bytes, free, experts_per_gpu)
        slots = hbm_cache if cache.scope == "global" else hbm_cache // spec.num_moe_layers
        if slots < working_set:
            where = "" if cache.scope == "global" else f" ({slots} slots per layer)"
            raise TierflowError(
                f"cache of {hbm_cache} experts per GPU{where} is smaller than one layer's working set of "
                f"{working_set} experts (batch {scenario.workload.batch_size}, top-{spec.top_k})"
            )
        hbm_cache = min(hbm_cache, experts_per_gpu)
        if cache.scope == "per-layer":  # the same slots for every layer
            layer_slots = (hbm_cache // spec.num_moe_layers,) * spec.num_moe_layers
    if scenario.placement == "ddr" and experts_per_gpu * expert_bytes > hardware.ddr.capacity_bytes:
        raise TierflowError(
            f"placement = 'ddr' needs {experts_per_gpu * expert_bytes / 1e9:.1f} GB of experts per GPU but the DDR "
            f"share per GPU is {hardware.ddr.capacity_bytes / 1e9:.1f} GB; use more gpus or placement = 'ssd'"
        )
    if scenario.ddr_cache.enabled:
        if scenario.placement != "ssd":
            raise TierflowError("ddr_cache.enabled needs placement = 'ssd' (a DDR cache in front of the SSD)")
        ddr = scenario.ddr_cache
        # SSD reads pass through the DDR cache itself (no staging buffer is set aside): by default it is the
        # whole DDR share.
        ddr_share = int(hardware.ddr.capacity_bytes)
        ddr_cache = _cache_experts(ddr.capacity_experts, ddr.capacity_bytes, gpus, expert_bytes,
                                   ddr_share // expert_bytes)
        if ddr_cache * expert_bytes > ddr_share:
            raise TierflowError(f"ddr_cache of {ddr_cache} experts per GPU exceeds the DDR share per GPU")
        if ddr_cache < 1:
            if ddr.capacity_experts is not None:
                given = f"ddr_cache.capacity_experts = {ddr.capacity_experts} over {gpus} GPU(s)"
            elif ddr.capacity_bytes is not None:
                given = f"ddr_cache.capacity_bytes = {ddr.capacity_bytes} over {gpus} GPU(s)"
            else:
                given = f"the {ddr_share / 1e9:.3f} GB DDR share per GPU"
            raise TierflowError(f"ddr_cache capacity must hold at least one expert of {expert_bytes / 1e9:.3f} GB; "
                                f"{given} holds none")
    elif (scenario.placement == "ssd" and ssd_reads_staged(scenario, hardware)
          and expert_bytes > staging_bytes(hardware)):
        raise TierflowError(
            f"SSD reads of {hardware.name!r} are staged through DDR, but an expert of {expert_bytes / 1e9:.2f} GB "
            f"cannot fit its {staging_bytes(hardware) / 1e9:.2f} GB staging buffer per GPU")
    return Plan(gpus, expert_bytes, free, hbm_cache, ddr_cache, kv_per_gpu, non_expert_per_gpu,
                min(scenario.workload.batch_size * spec.top_k, held), layer_slots)


def _check_cache_bytes(experts: int, expert_bytes: int, free: int, held: int) -> None:
    """A cache's capacity is HBM set aside; ``held``: the experts the GPU holds (named when the cache asks for
    more)."""
    if experts * expert_bytes > free:
        hint = "" if experts <= held else (f"; the model has only {held} experts per GPU, which a cache of "
                                           f"{held} per GPU holds ({held * expert_bytes / 1e9:.1f} GB)")
        raise TierflowError(f"cache of {experts} experts per GPU needs {experts * expert_bytes / 1e9:.1f} GB but "
                            f"only {free / 1e9:.1f} GB of HBM is free after weights and KV cache{hint}")


def _layer_slots(given: tuple[int, ...], model: str, held: int, gpus: int,
                 working_sets: np.ndarray) -> tuple[int, ...]:
    """``cache.layer_slots`` per GPU: each layer's slots over all GPUs, each GPU ``ceil(slots / gpus)`` of them
    (at most ``held``, the layer's experts it holds), checked against each layer's working set."""
    if len(given) != len(working_sets):
        raise TierflowError(f"cache.layer_slots has {len(given)} budget(s); model {model!r} has "
                            f"{len(working_sets)} MoE layers")
    slots = tuple(min(-(-total // gpus), held) for total in given)
    for layer, (slot, need) in enumerate(zip(slots, working_sets.tolist(), strict=True)):
        if slot < need:
            raise TierflowError(
                f"cache.layer_slots: MoE layer {layer} has {slot} slots per GPU ({given[layer]} over {gpus} GPU(s)), "
                f"fewer than its working set of {need} experts")
    return slots


def _cache_experts(capacity_experts, capacity_bytes, gpus, expert_bytes, default_per_gpu) -> int:
    if capacity_experts is not None:
        return -(-capacity_experts // gpus)  # whole numbers: a float would overflow for huge counts
    if capacity_bytes is not None:
        return int(capacity_bytes // gpus // expert_bytes)
    return int(default_per_gpu)


def energy_model(scenario: Scenario, hardware: HardwareProfile, gpus: int) -> EnergyModel:
    e = scenario.energy

    def pick(override, value):
        return value if override is None else override

    links = {hardware.host_link.name: pick(e.link_pj_per_bit, hardware.host_link.pj_per_bit),
             hardware.ssd_link.name: pick(e.link_pj_per_bit, hardware.ssd_link.pj_per_bit)}
    # The GPU-to-GPU links of compute's collectives keep their own figures (link_pj_per_bit is the offload links').
    for link in (hardware.nvlink, hardware.internode):
        if link is not None and link.name not in links:
            links[link.name] = link.pj_per_bit
    hbm, ddr, ssd = hardware.gpu.hbm, hardware.ddr, hardware.ssd
    return EnergyModel(
        read_pj_per_bit={"hbm": pick(e.hbm_read_pj_per_bit, hbm.read_pj_per_bit),
                         "ddr": pick(e.ddr_read_pj_per_bit, ddr.read_pj_per_bit),
                         "ssd": pick(e.ssd_read_pj_per_bit, ssd.read_pj_per_bit)},
        write_pj_per_bit={"hbm": pick(e.hbm_write_pj_per_bit, hbm.write_pj_per_bit),
                          "ddr": pick(e.ddr_write_pj_per_bit, ddr.write_pj_per_bit),
                          "ssd": ssd.write_pj_per_bit},
        link_pj_per_bit=links,
        pj_per_flop=pick(e.pj_per_flop, hardware.gpu.pj_per_flop),
        l1_pj_per_bit=pick(e.l1_pj_per_bit, hardware.gpu.l1_pj_per_bit or 0.0),
        l2_pj_per_bit=pick(e.l2_pj_per_bit, hardware.gpu.l2_pj_per_bit or 0.0),
        static_w={"gpu": gpus * pick(e.gpu_static_w, hardware.gpu.static_power_w + hbm.static_power_w),
                  "ddr": gpus * pick(e.ddr_static_w, ddr.static_power_w),
                  "ssd": gpus * pick(e.ssd_static_w, ssd.static_power_w)},
    )


def ssd_reads_staged(scenario: Scenario, hardware: HardwareProfile) -> bool:
    """Whether SSD reads bounce through host DDR (a DDR expert cache, or no GPUDirect Storage). Staged or not,
    they reach HBM over the GPU's host link."""
    return scenario.ddr_cache.enabled or not hardware.gpudirect_storage


def offload_bandwidth(scenario: Scenario, hardware: HardwareProfile) -> float:
    """The rate at which one GPU's expert copies arrive in its HBM from the placement tier."""
    if scenario.placement == "ddr":
        return min(hardware.host_link.bandwidth_bytes_per_s, hardware.ddr.read_bandwidth_bytes_per_s)
    # Staged or direct (GPUDirect Storage), SSD reads enter the GPU over its host link (the fetch path's last hop).
    return min(sustained_read_bytes_per_s(hardware.ssd, hardware.ssd_link), hardware.host_link.bandwidth_bytes_per_s)


def compute_hbm_bandwidth(scenario: Scenario, hardware: HardwareProfile) -> float:
    """HBM bandwidth left for compute: all of it, or (``timing.offload_takes_hbm_bandwidth``, experts off the
    GPU) what the offload copies leave."""
    hbm = hardware.gpu.hbm.read_bandwidth_bytes_per_s
    if not scenario.timing.offload_takes_hbm_bandwidth or scenario.placement == "hbm":
        return hbm
    left = hbm - offload_bandwidth(scenario, hardware)
    if left <= 0:
        raise TierflowError(f"timing.offload_takes_hbm_bandwidth: the offload rate of {hardware.name!r} leaves no "
                            f"HBM bandwidth for compute ({hbm / 1e9:.0f} GB/s)")
    return left


def _contention(scenario: Scenario, hardware: HardwareProfile) -> tuple[float, str]:
    """The HBM bandwidth compute keeps while offload copies run, and when copies run beside compute (see
    :class:`ComputeModels`)."""
    left = compute_hbm_bandwidth(scenario, hardware)
    if left == hardware.gpu.hbm.read_bandwidth_bytes_per_s:
        return left, "never"
    return left, "always" if scenario.timing.expert_copies == "ahead" else "in_flight"


class Simulation:
    """One scenario wired into a SimPy environment; :meth:`run` returns :class:`Results`."""

    def __init__(self, scenario: Scenario, trace: str | None = None, progress=None):
        self.scenario = scenario
        self.spec = get_model(scenario.model)
        self.hardware = get_profile(scenario.hardware)
        check_policies(scenario)
        check_hbm(scenario, self.spec, self.hardware)  # before the workload: a batch that cannot fit fails fast
        self.workload = load_scenario_workload(scenario, self.spec, trace)
        self.plan = plan_capacity(scenario, self.spec, self.hardware, self.workload)
        self.env = simpy.Environment()
        self.calendar = Calendar()  # the data paths' events, which the GPU stream catches up with
        self.ledger = Ledger()
        self.energy = energy_model(scenario, self.hardware, self.plan.gpus)
        self.routes = self._routes()
        self.memories = [self._memory(gpu) for gpu in range(self.plan.gpus)]
        self.prefetcher = self._prefetcher()
        # Only a prefetcher that listens is told of evictions: nearly every miss evicts.
        if self.prefetcher is not None and type(self.prefetcher).on_eviction is not Prefetcher.on_eviction:
            experts = self.workload.num_experts
            for memory in self.memories:
                memory.eviction_listeners.append(lambda key: self.prefetcher.on_eviction(key // experts, key % experts))
        # Offline policies (Belady) in either cache read each access's next use from the workload.
        offline = [POLICIES.get(cache.policy).needs_future and capacity is not None
                   for cache, capacity in ((scenario.cache, self.plan.hbm_cache_experts),
                                           (scenario.ddr_cache, self.plan.ddr_cache_experts))]
        future = None
        if any(offline):
            future = FutureIndex(self.workload.steps, self.workload.num_layers, self.workload.num_experts,
                                 self.workload.top_k)
        self.compute_models = ComputeModels(self.spec, self.hardware, self.plan.gpus, scenario.attention_tp,
                                            *_contention(scenario, self.hardware), kv_split=scenario.kv_split)
        self.compute = self.compute_models.get(scenario.workload.batch_size)  # the full batch's, outside copies
        self.stream = GpuStream(
            self.env, self.workload, self.memories, self.compute_models, self.prefetcher, self.ledger,
            scenario.workload.context_length, self._lookahead(), scenario.prefetch.budget_experts,
            scenario.prefetch.max_queued, future, progress, copies_ahead=scenario.timing.expert_copies == "ahead",
        )

    def _cache(self, name, policy, params, capacity_experts, layer_slots=None):
        """A global pool of ``capacity_experts``, or (``layer_slots`` given) per-layer slots."""
        w = self.workload
        scope, capacity = ("global", capacity_experts) if layer_slots is None else ("per-layer", list(layer_slots))
        return make_expert_cache(policy, scope, capacity, num_layers=w.num_layers, num_experts=w.num_experts,
                                 top_k=w.top_k, expert_bytes=self.plan.expert_bytes, params=params, name=name,
                                 router_scores=w.has_scores)

    def _memory(self, gpu: int) -> ExpertMemory:
        scenario, hw, calendar = self.scenario, self.hardware, self.calendar
        plan = self.plan
        hbm = ddr = None
        if plan.hbm_cache_experts is not None:
            hbm = self._cache(f"hbm{gpu}", scenario.cache.policy, scenario.cache.params, plan.hbm_cache_experts,
                              plan.layer_slots)
        if plan.ddr_cache_experts is not None:
            ddr = self._cache(f"ddr{gpu}", scenario.ddr_cache.policy, scenario.ddr_cache.params,
                              plan.ddr_cache_experts)
        host_link = LinkChannel(calendar, hw.host_link, TRANSFER_CHUNK_BYTES, name=f"{hw.host_link.name} #{gpu}")
        paths = {"ddr": FetchPath([host_link], self.routes["ddr"])}
        if scenario.placement == "ssd":
            ssd = SsdChannel(calendar, hw.ssd, hw.ssd_link, TRANSFER_CHUNK_BYTES, name=f"{hw.ssd.name} #{gpu}")
            staging = (StagingBuffer(calendar, staging_bytes(hw), prefetch_reserve_bytes=plan.expert_bytes)
                       if ssd_reads_staged(scenario, hw) and ddr is None else None)
            paths["ssd"] = FetchPath([ssd, host_link], self.routes["ssd"], staging)
        for path in paths.values():
            for channel in path.hops:
                channel.preemptive = scenario.prefetch.preempt
        return ExpertMemory(calendar, gpu, hbm, ddr, paths, scenario.placement, plan.expert_bytes, self.ledger,
                            self.workload.num_layers, reserve_bytes=self._prefetch_reserve())

    def _routes(self) -> dict[str, Route]:
        """Each source tier's route into HBM, by tier. Every GPU's path shares the one object: the ledger's tables
        then find a route by identity rather than by comparing its fields."""
        hw = self.hardware
        routes = {"ddr": Route("ddr", "hbm", (hw.host_link.name,))}
        if self.scenario.placement == "ssd":
            # A drive that sits on the GPU's own offload link (the seed paper's profiles) sends its bits over that
            # link once: the drive's channel is capped at the link's rate and the link channel carries them.
            links = (hw.host_link.name,) if hw.ssd_link == hw.host_link else (hw.ssd_link.name, hw.host_link.name)
            routes["ssd"] = Route("ssd", "hbm", links, "ddr" if ssd_reads_staged(self.scenario, hw) else None)
        return routes

    def _prefetch_reserve(self) -> int:
        """The unpinned room a prefetch leaves for the next demand: the most experts one layer of one step can
        ask of this GPU (the batch's tokens x top_k, at most the layer's experts it holds). Known before the run:
        the layer working sets the run will meet are the trace's future, which an online prefetcher cannot
        read. In per-layer slots each layer keeps this room in its own slots."""
        return self.plan.step_demand_bound * self.plan.expert_bytes

    def _prefetcher(self):
        prefetch = self.scenario.prefetch
        if prefetch.policy == "none" or self.plan.hbm_cache_experts is None:
            make_prefetcher(prefetch.policy, prefetch.params, self._prefetch_context())  # validates the name
            return None
        return make_prefetcher(prefetch.policy, prefetch.params, self._prefetch_context())

    def _lookahead(self) -> int:
        return prefetch_lookahead(self.scenario, self.workload.num_layers)

    def _prefetch_context(self) -> PrefetchContext:
        w = self.workload
        return prefetch_context(self.scenario, w.num_layers, w.num_experts, w.top_k, w)

    @property
    def channels(self) -> list:
        """Every link and drive of the data paths, once each, GPU by GPU."""
        seen = {}
        for memory in self.memories:
            for path in memory.paths.values():
                for channel in path.hops:
                    seen.setdefault(id(channel), channel)
        return list(seen.values())

    def run(self) -> Results:
        self.env.run(until=self.stream.process)
        self.elapsed_s = float(self.env.now)
        # Transfers still in flight (prefetches nobody waited for) land on the data paths' calendar, so the
        # ledger holds every byte that was moved; time, and so static energy, stops with the last token.
        for memory in self.memories:
            memory.finish()
        return collect_results(self)
