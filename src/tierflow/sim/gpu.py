"""The GPU compute stream: per decode step, per MoE layer, attention, routing, wait for the layer's experts,
then expert compute. Compute overlaps transfers; a layer stalls only for experts not yet resident.

Compute time is a roofline: ``max(FLOPs / peak, bytes read / HBM bandwidth)`` for each phase. With N GPUs,
attention and dense layers run in N / TP data-parallel groups of TP tensor-parallel GPUs (TP = N unless the
scenario sets ``attention_tp``): each group decodes its share of the batch, reads its own replica of the
weights split TP ways, and all-reduces its activations over NVLink. Experts are expert-parallel over all N
GPUs (expert ``e`` lives on GPU ``e mod N``; the busiest GPU sets the layer's pace, plus the all-to-all that
sends tokens to their experts and back).
"""

from __future__ import annotations

from collections import deque

import attrs

from tierflow.cache import NEVER, Access
from tierflow.catalog.hardware import HardwareProfile, Link
from tierflow.catalog.models import ModelSpec
from tierflow.ledger import Ledger
from tierflow.prefetch import DemandEvent, Prefetcher, RoutingEvent
from tierflow.sim.calendar import timeout_towards
from tierflow.sim.transfer import Arrival

# BF16 activations exchanged between GPUs ([DER] assumption: weights may be FP8 or MXFP4, activations BF16).
ACTIVATION_BYTES = 2


# A GEMM's weights cross L1 once per register tile of this many tokens (the 16 x 16 tiles of the tile model
# in Kyung et al.'s artifact, src/hardware/tile.h).
L1_TILE_TOKENS = 16


def l1_passes(tokens: int) -> int:
    """How often a weight byte crosses L1 when ``tokens`` tokens use it (at least once)."""
    return max(1, -(-tokens // L1_TILE_TOKENS))


def kv_layout(spec: ModelSpec, tp: int, kv_split: str = "heads") -> tuple[float, float]:
    """How a tensor-parallel group of ``tp`` GPUs holds its KV cache: ``(share, copies)``, the fraction of the
    group's cache on its fullest GPU and how many copies of it the group holds in all.

    ``"heads"``: a GPU keeps the KV heads it attends with, ``ceil(heads / tp)`` of them, so with fewer heads than
    GPUs every GPU holds one (replicas), MLA's one latent is on every GPU, and heads that the GPUs do not
    divide leave some GPUs one more. ``"even"``: the cache divided evenly over the group, one copy (the
    assumption that reproduces the seed paper's figures)."""
    if kv_split == "even":
        return 1.0 / tp, 1.0
    heads = spec.attention.kv_heads
    return -(-heads // tp) / heads, max(heads, tp) / heads


def attention_groups(gpus: int, attention_tp: int | None, batch_size: int) -> tuple[int, int, int]:
    """``(tp, dp, group_batch)``: GPUs per tensor-parallel attention group (all, unless set), the number of
    data-parallel groups, and the sequences of the busiest group."""
    tp = attention_tp or gpus
    dp = gpus // tp
    return tp, dp, -(-batch_size // dp)


@attrs.frozen
class Phase:
    """One roofline phase: its duration and what it reads and computes (summed over GPUs).

    On-chip traffic: every byte read from HBM crosses L2 once; ``l1_bytes`` is what crosses L1 (weights once
    per tile of tokens, the KV cache once). ``collective_bytes``: ``(link name, bytes)`` pairs that the phase's
    all-reduces and all-to-alls send between GPUs, summed over the senders."""

    seconds: float
    flops: float
    hbm_read_bytes: float
    l1_bytes: float = 0.0
    collective_bytes: tuple = ()


class ComputeModel:
    """Roofline times of each phase of a decode step for a model on N GPUs of a hardware profile.

    The model's per-token figures are read once; the per-layer work is then plain arithmetic, since it
    runs for every layer of every step. Attention work over the KV cache is linear in the tokens a layer
    attends to (the whole context, or the sliding window). A step's ``context`` is the tokens in each of its
    sequences' KV cache: one int when all have the same, else one int per sequence; a data-parallel group's
    share of the batch attends to its share of the tokens (the batch is balanced over the groups).
    """

    def __init__(self, spec: ModelSpec, hardware: HardwareProfile, gpus: int, batch_size: int,
                 hbm_bandwidth_bytes_per_s: float | None = None, attention_tp: int | None = None,
                 kv_split: str = "heads"):
        self.spec, self.gpus, self.batch = spec, gpus, batch_size
        self.tp, self.dp, self.group_batch = attention_groups(gpus, attention_tp, batch_size)
        self.kv_share, self.kv_copies = kv_layout(spec, self.tp, kv_split)
        self.peak_flops = hardware.gpu.peak_flops
        # GEMMs over FP8 weights run at the FP8 rate where the GPU has one; the rest (attention over the BF16 KV
        # cache, the BF16 LM head, anything on a GPU without FP8) at the BF16 peak.
        fp8 = hardware.gpu.peak_flops_fp8
        self._expert_rate = fp8 if fp8 and spec.fp8_experts else self.peak_flops
        self._weight_rate = fp8 if fp8 and spec.fp8_non_expert else self.peak_flops
        self.hbm_bw = hbm_bandwidth_bytes_per_s or hardware.gpu.hbm.read_bandwidth_bytes_per_s
        self.nvlink: Link | None = hardware.nvlink
        self.internode: Link | None = hardware.internode
        self.gpus_per_node = hardware.gpus_per_node or gpus
        self.expert_flops = spec.expert_flops_per_token
        self.expert_bytes = spec.expert_bytes
        context_flops = spec.attention.context_flops_per_token
        self._flops_per_attended = context_flops(2) - context_flops(1)
        self._moe_fixed_flops = (spec.non_expert_flops_per_token_per_moe_layer(1) - self._flops_per_attended)
        self._dense_fixed_flops = (spec.non_expert_flops_per_token_per_dense_layer(1) - self._flops_per_attended)
        self._kv_per_token = spec.kv_bytes_per_token_per_layer
        self._window = {layer: spec.sliding_window_tokens for layer in spec.sliding_window_layers}
        self._moe_layer_bytes = spec.non_expert_bytes_per_moe_layer
        self._attention_memo: dict[int, Phase] = {}
        self._experts_memo: dict[tuple, Phase] = {}
        self._contexts: tuple | None = None  # the per-sequence contexts _attended last saw, and their sums
        self._attended_memo: dict[int | None, int] = {}
        self._allreduce_s = self._all_reduce_s(self.group_batch * spec.hidden_size * ACTIVATION_BYTES, self.tp)
        self._allreduce_bytes = self._all_reduce_bytes(self.batch * spec.hidden_size * ACTIVATION_BYTES, self.tp)
        # Dispatch and combine: each GPU holds 1/N of the batch's token-to-expert copies and sends them to
        # the experts' GPUs, then gets the results back.
        copies_per_gpu = self.batch * spec.top_k * spec.hidden_size * ACTIVATION_BYTES / gpus
        self._dispatch_s = 2 * self._all_to_all_s(copies_per_gpu)
        self._dispatch_bytes = tuple((name, 2 * sent) for name, sent in self._all_to_all_bytes(copies_per_gpu))

    def _roofline(self, flops_per_gpu: float, bytes_per_gpu: float, rate: float | None = None) -> float:
        return max(flops_per_gpu / (rate or self.peak_flops), bytes_per_gpu / self.hbm_bw)

    def _all_reduce_s(self, bytes_per_gpu: float, n: int) -> float:
        """Ring all-reduce of ``bytes_per_gpu`` among ``n`` GPUs: 2 (n-1) steps, each a link latency plus
        1/n of the data; over NVLink within a node, else over the network."""
        link = self.nvlink if n <= self.gpus_per_node else self.internode
        if n == 1 or link is None:
            return 0.0
        return 2 * (n - 1) * (link.latency_s + bytes_per_gpu / n / link.bandwidth_bytes_per_s)

    def _all_reduce_bytes(self, bytes_all_groups: float, n: int) -> tuple:
        """What ring all-reduces send, summed over the groups: each GPU of a group sends 2 (n-1)/n of the
        group's vector, so a group sends 2 (n-1) vectors (``bytes_all_groups`` is the vectors' sum), evenly over
        the ring's n hops; a ring over k nodes crosses the network on k of them, NVLink on the rest."""
        if n == 1:
            return ()
        sent = 2 * (n - 1) * bytes_all_groups
        if n <= self.gpus_per_node:
            return () if self.nvlink is None else ((self.nvlink.name, sent),)
        nodes = -(-n // self.gpus_per_node)
        return tuple((link.name, sent * hops / n) for link, hops in ((self.nvlink, n - nodes), (self.internode, nodes))
                     if link is not None and hops)

    def _all_to_all_bytes(self, bytes_per_gpu: float) -> tuple:
        """What an all-to-all sends over each kind of link, summed over the N GPUs: each GPU sends 1/N of its
        ``bytes_per_gpu`` to every peer, over NVLink to the peers in its node (nodes of ``gpus_per_node``, the
        last one partial) and over the network to the others."""
        n, local = self.gpus, self.gpus_per_node
        sizes = [local] * (n // local) + ([n % local] if n % local else [])
        local_pairs = sum(size * (size - 1) for size in sizes)
        return tuple((link.name, bytes_per_gpu / n * pairs) for link, pairs in
                     ((self.nvlink, local_pairs), (self.internode, n * (n - 1) - local_pairs))
                     if pairs and link is not None)

    def _all_to_all_s(self, bytes_per_gpu: float) -> float:
        """All-to-all among all GPUs, each sending ``bytes_per_gpu`` spread evenly over the GPUs: the share
        bound for the GPU's own node goes over NVLink, the rest over its network link, both at once. Each
        peer's message is charged the link latency in turn (an assumption, see README: with sends to all peers
        fully overlapped it would be one latency)."""
        n, local = self.gpus, self.gpus_per_node
        times = []
        for link, peers in ((self.nvlink, min(n, local) - 1), (self.internode, n - min(n, local))):
            if peers and link is not None:
                times.append(peers * link.latency_s + bytes_per_gpu * peers / n / link.bandwidth_bytes_per_s)
        return max(times, default=0.0)

    def _tensor_parallel(self, flops_per_token: float, weight_bytes: float, kv_bytes_per_token: float,
                         collective_s: float, collective_bytes: tuple = (),
                         weight_flops_per_token: float = 0.0) -> Phase:
        """A phase run by every data-parallel group on its share of the batch, split over the group's GPUs; the
        busiest group sets the time, and every group with a sequence to decode reads its own replica of the
        weights (with fewer sequences than groups, the others sit idle and read nothing). Each GPU reads the
        KV cache it holds: the fullest ``kv_share`` of the group's, ``kv_copies`` copies in all (see
        :func:`kv_layout`). ``weight_flops_per_token`` of the ``flops_per_token`` are GEMMs over the layer's
        weights, at the FP8 rate when they are FP8."""
        tp, group = self.tp, self.group_batch
        memory_bytes = weight_bytes / tp + group * kv_bytes_per_token * self.kv_share
        if self._weight_rate == self.peak_flops or not weight_flops_per_token:
            seconds = self._roofline(group * flops_per_token / tp, memory_bytes)
        else:
            compute = group * ((flops_per_token - weight_flops_per_token) / self.peak_flops
                               + weight_flops_per_token / self._weight_rate) / tp
            seconds = max(compute, memory_bytes / self.hbm_bw)
        per_token = self.batch * kv_bytes_per_token * self.kv_copies  # a replicated head is read by every holder
        replicas = min(self.dp, self.batch) * weight_bytes
        return Phase(seconds + collective_s, self.batch * flops_per_token, replicas + per_token,
                     replicas * l1_passes(group) + per_token, collective_bytes)

    def _attended(self, context, layer: int) -> int:
        """The tokens the batch attends to at model layer ``layer``, summed over its sequences."""
        window = self._window.get(layer)
        if isinstance(context, int):
            return self.batch * (context if window is None else min(context, window))
        if context is not self._contexts:
            if len(context) != self.batch:
                raise ValueError(f"{len(context)} contexts for a batch of {self.batch}")
            self._contexts, self._attended_memo = context, {}
        total = self._attended_memo.get(window)
        if total is None:
            total = sum(context) if window is None else sum(min(c, window) for c in context)
            self._attended_memo[window] = total
        return total

    def _attention(self, attended: int, fixed_flops: float, weight_bytes: float, all_reduces: int) -> Phase:
        """A layer's attention for a batch attending to ``attended`` tokens in all."""
        per_sequence = attended / self.batch
        return self._tensor_parallel(fixed_flops + self._flops_per_attended * per_sequence, weight_bytes,
                                     per_sequence * self._kv_per_token, all_reduces * self._allreduce_s,
                                     tuple((name, all_reduces * sent) for name, sent in self._allreduce_bytes),
                                     weight_flops_per_token=fixed_flops)

    def dense_prefix(self, context) -> Phase:
        """The dense layers before the first MoE layer (attention + dense FFN), tensor-parallel."""
        spec = self.spec
        # Two all-reduces a dense layer: after attention and after the FFN.
        phases = [self._attention(self._attended(context, layer), self._dense_fixed_flops,
                                  spec.non_expert_bytes_per_dense_layer, 2)
                  for layer in range(spec.num_dense_layers)]
        collectives: dict[str, float] = {}
        for phase in phases:
            for name, sent in phase.collective_bytes:
                collectives[name] = collectives.get(name, 0.0) + sent
        return Phase(sum(p.seconds for p in phases), sum(p.flops for p in phases),
                     sum(p.hbm_read_bytes for p in phases), sum(p.l1_bytes for p in phases), tuple(collectives.items()))

    def attention(self, context, moe_layer: int) -> Phase:
        """Attention, router and shared experts of one MoE layer, tensor-parallel (one all-reduce, an
        assumption: the shared experts' partial sums are taken to be summed in the routed experts' combine).
        Layers that attend to the same number of tokens cost the same, so a step computes each kind once."""
        attended = self._attended(context, self.spec.first_moe_layer + moe_layer)
        phase = self._attention_memo.get(attended)
        if phase is None:
            if len(self._attention_memo) > 8:  # a step's worth: each has one or two (full, windowed)
                self._attention_memo.clear()
            phase = self._attention_memo[attended] = self._attention(attended, self._moe_fixed_flops,
                                                                     self._moe_layer_bytes, 1)
        return phase

    def experts(self, experts: list[int], tokens_per_expert: list[int]) -> Phase:
        """Routed experts of one MoE layer, expert-parallel: the busiest GPU sets the time."""
        n = self.gpus
        # Plain Python: a layer has a handful of experts, too few for numpy to pay off.
        held = [0] * n  # experts per GPU
        for expert in experts:
            held[expert % n] += 1
        if tokens_per_expert.count(1) == len(tokens_per_expert):  # one token each (batch 1): tokens follow experts
            busiest_tokens, total_tokens = max(held), len(experts)
        else:
            tokens = [0] * n
            for expert, routed in zip(experts, tokens_per_expert, strict=True):
                tokens[expert % n] += routed
            busiest_tokens, total_tokens = max(tokens), sum(tokens)
        l1_passes_sum = None if max(tokens_per_expert) <= L1_TILE_TOKENS else sum(map(l1_passes, tokens_per_expert))
        # Layers with the same figures cost the same, and a run meets few combinations of them.
        figures = busiest_tokens, max(held), total_tokens, len(experts), l1_passes_sum
        phase = self._experts_memo.get(figures)
        if phase is None:
            if len(self._experts_memo) > 4096:
                self._experts_memo.clear()
            phase = self._experts_memo[figures] = self._experts(*figures)
        return phase

    def _experts(self, busiest_tokens: int, busiest_experts: int, total_tokens: int, experts: int,
                 l1_passes_sum: int | None) -> Phase:
        """The phase of :meth:`experts` from its figures: the busiest GPU's tokens and experts, the layer's tokens
        and experts, and the L1 passes its weights take (None: one pass each)."""
        size = self.expert_bytes
        read = experts * size
        l1 = read if l1_passes_sum is None else size * l1_passes_sum
        # The busiest GPU's roofline: the max over GPUs of max(compute, memory) is the larger of the two maxima.
        # On one GPU the dispatch is free (0 s, no bytes).
        busiest = self._roofline(busiest_tokens * self.expert_flops, busiest_experts * size, self._expert_rate)
        return Phase(busiest + self._dispatch_s, total_tokens * self.expert_flops, read, l1, self._dispatch_bytes)

    def lm_head(self) -> Phase:
        spec = self.spec
        # The LM head stays unquantized (BF16) in the FP8 and MXFP4 releases, as the catalog's embedding bytes.
        return self._tensor_parallel(spec.lm_head_flops_per_token,
                                     spec.lm_head_flops_per_token / 2 * spec.unquantized_bytes_per_param, 0.0, 0.0)


class ComputeModels:
    """The compute model for each (batch size, HBM bandwidth) a run needs, built on first use.

    The batch shrinks when a trace runs out of sequences to take the slots of those that ended, and each step
    is charged for the sequences it decodes. With ``timing.offload_takes_hbm_bandwidth``, compute gets the HBM
    bandwidth the offload copies leave (``contended_bw``) while copies run beside it: in every phase when copies
    are queued ahead (``contention = "always"``: the seed paper's continuous stream of copies, kept as its
    reproduction assumes it, dense layers and LM head included), else in the phases that start while a copy is
    in flight (``"in_flight"``; a layer that waits for its demand misses computes after they land, so only
    prefetches overlap compute). ``"never"``: the full bandwidth throughout."""

    def __init__(self, spec: ModelSpec, hardware: HardwareProfile, gpus: int, attention_tp: int | None,
                 contended_bw: float, contention: str, kv_split: str = "heads"):
        self.spec, self.hardware, self.gpus, self.attention_tp = spec, hardware, gpus, attention_tp
        self.kv_split = kv_split
        self.full_bw = hardware.gpu.hbm.read_bandwidth_bytes_per_s
        self.contended_bw, self.contention = contended_bw, contention
        self._models: dict[tuple[int, bool], ComputeModel] = {}

    def get(self, batch: int, contended: bool = False) -> ComputeModel:
        contended = self.contention == "always" or (contended and self.contention == "in_flight")
        model = self._models.get((batch, contended))
        if model is None:
            model = self._models[batch, contended] = ComputeModel(
                self.spec, self.hardware, self.gpus, batch, self.contended_bw if contended else self.full_bw,
                self.attention_tp, self.kv_split)
        return model


@attrs.define
class StepRecord:
    """One step's time and its demand lookups (summed over GPUs): resident, on their way, missing; and its
    prefetches (:data:`PREFETCH_SERIES`: started, used, used while still in flight, bytes evicted unused, used
    by the step they were proposed for)."""

    latency_s: float
    stall_s: float
    hits: int
    misses: int
    in_flight: int = 0
    prefetch: tuple = (0, 0, 0, 0, 0)


# The per-step prefetch counts, in StepRecord.prefetch's order; each is the change in a PrefetchStats field.
PREFETCH_SERIES = ("issued", "useful", "late", "wasted_bytes", "on_target")


def prefetch_counts(memories) -> tuple:
    """The PREFETCH_SERIES fields summed over the GPUs' memories."""
    return tuple(sum(getattr(m.prefetch, name) for m in memories) for name in PREFETCH_SERIES)


def access_time(step: int, layer: int, num_layers: int, top_k: int) -> int:
    """``Access.time`` of a layer's lookups: where a replay of one token per step would be at the layer's first
    request, so that policies timing accesses in these units (``time / (num_layers * top_k)`` steps) read the
    same clock in the simulator as in replay. A layer's lookups share it."""
    return (step * num_layers + layer) * top_k


class FutureIndex:
    """For offline policies: when each key is used next (in :func:`access_time` units), from the workload's own
    future."""

    def __init__(self, steps, num_layers: int, num_experts: int, top_k: int):
        self._uses: dict[int, list[int]] = {}
        for step in steps:
            for layer, experts in enumerate(step.experts):
                time = access_time(step.index, layer, num_layers, top_k)
                for expert in experts.tolist():
                    self._uses.setdefault(layer * num_experts + expert, []).append(time)
        self._next: dict[int, int] = dict.fromkeys(self._uses, 0)

    def next_use_after(self, key: int, time: int) -> float:
        uses, i = self._uses.get(key), self._next.get(key, 0)
        if uses is None:
            return NEVER
        while i < len(uses) and uses[i] <= time:
            i += 1
        self._next[key] = i
        return uses[i] if i < len(uses) else NEVER


class GpuStream:
    """The SimPy process that runs the decode steps on all GPUs in lockstep."""

    def __init__(self, env, workload, memories, compute: ComputeModels, prefetcher, ledger: Ledger,
                 context_length: int, lookahead: int, budget_experts: int, max_queued: int,
                 future: FutureIndex | None, progress=None, copies_ahead: bool = False):
        self.env, self.workload, self.memories = env, workload, memories
        # Ideal prefetch: every layer's copies are queued when the step reaches its first MoE layer.
        self.copies_ahead = copies_ahead
        self.compute_models, self.prefetcher, self.ledger = compute, prefetcher, ledger
        self.context_length, self.lookahead, self.budget = context_length, lookahead, budget_experts
        self.max_queued = max_queued
        self.future = future
        self.progress = progress
        self.records: list[StepRecord] = []
        self.calendar = memories[0].calendar  # where the data paths' events wait until the stream looks
        self.wake = None  # the stream's place in the calendar's order when its current timeout ends
        self._access = Access(0, 0)  # one record for every demand lookup: policies copy what they keep
        self._prefetch_access = Access(0, 0, prefetch=True)  # reused for every prefetch (policies copy)
        self.position = (-1, -1)  # (step, layer) whose routing the stream has reached
        # Hits and misses go to the prefetcher only if it listens: the event costs time at every layer.
        self.tells_demand = prefetcher is not None and type(prefetcher).on_demand is not Prefetcher.on_demand
        # Per GPU, proposals refused only because the source queue was full: (key, step, target layer), offered
        # again whenever a transfer leaves that queue; at most a budget's worth, the oldest dropped first.
        self.deferred = None
        if prefetcher is not None and budget_experts > 0:
            self.deferred = [deque(maxlen=budget_experts) for _ in memories]
            for gpu, memory in enumerate(memories):
                # The drive (or link) prefetches read through first; with a DDR cache, also the host link that
                # the experts it holds are read over.
                sources = {id(s): s for s in (memory.prefetch_source, memory.ddr_source) if s is not None}
                for source in sources.values():
                    source.dequeue_listeners.append(lambda _channel, gpu=gpu: self._offer_deferred(gpu))
                if memory.prefetch_staging is not None:  # reads waiting for staging count toward the queue too
                    memory.prefetch_staging.start_listeners.append(lambda _buffer, gpu=gpu: self._offer_deferred(gpu))
        self.process = env.process(self._run())

    def _phase(self, *phases: Phase):
        """One timeout for phases that run back to back; their work goes to the ledger."""
        seconds = 0.0
        for phase in phases:
            self.ledger.record_compute(phase.flops, phase.hbm_read_bytes, phase.l1_bytes, phase.collective_bytes)
            seconds += phase.seconds
        self.wake = self.calendar.mark(self.env.now + seconds)  # SimPy's own sum, so the times agree exactly
        return self.env.timeout(seconds)

    def _finish_experts(self, in_use, started: float, experts: Phase | None) -> None:
        """Release a layer's experts (``in_use``) when their compute (``experts``, the first phase of the timeout
        that began at ``started``) ends: the data paths' events up to then run first, so a prefetch admitted
        meanwhile (one deferred for a full queue) cannot evict an expert in use."""
        if in_use:
            self.calendar.advance(self.calendar.mark(started + experts.seconds))
            for memory, key in in_use:
                memory.release(key)

    def _arrival(self, transfers):
        """A timeout towards the moment the last of ``transfers`` lands (see :func:`timeout_towards`)."""
        self.wake = self.calendar.run_until(Arrival(self.calendar, transfers))
        return timeout_towards(self.env, self.wake[0])

    def _compute(self, batch: int) -> ComputeModel:
        """The compute model for a phase starting now: the step's batch, and whether copies are in flight."""
        models = self.compute_models
        if models.contention != "in_flight":
            return models.get(batch)
        return models.get(batch, any(memory.in_flight for memory in self.memories))

    def _run(self):
        env, calendar, workload, memories = self.env, self.calendar, self.workload, self.memories
        num_layers = workload.num_layers
        looks_up = not all(memory.all_resident for memory in memories)
        repick = self.compute_models.contention == "in_flight"  # the bandwidth may change between a step's phases
        for step in workload.steps:
            start = env.now
            stall = 0.0
            hits_before = sum(m.demand_hits for m in memories)
            misses_before = sum(m.demand_misses for m in memories)
            in_flight_before = sum(m.demand_in_flight for m in memories)
            prefetch_before = prefetch_counts(memories) if self.prefetcher is not None else None
            batch = len(step.sequence_ids)
            # Each sequence's KV cache: the context it came with and the steps it has decoded since.
            context = tuple(self.context_length + p for p in step.positions.tolist())
            compute = self._compute(batch)
            # Compute between two routing decisions is one timeout: a layer's expert compute and the next
            # layer's attention run back to back. The stream admits nothing between them; the data paths' events
            # in between (a deferred prefetch starting as a queue drains) run when it catches up, with the
            # layer's experts pinned until their compute ends (_finish_experts).
            pending = compute.dense_prefix(context)
            in_use = None  # the previous layer's (memory, key) pairs: pinned until its expert compute ends
            ahead = None
            if self.copies_ahead and looks_up:  # the dense layers run first; then every layer's copies queue
                yield self._phase(pending)
                calendar.advance(self.wake)
                pending = None
                ahead = [self._demand(step, layer) for layer in range(num_layers)]
            for layer in range(num_layers):
                attention = compute.attention(context, layer)
                started = env.now
                yield self._phase(attention) if pending is None else self._phase(pending, attention)
                self._finish_experts(in_use, started, pending)
                in_use = None
                calendar.advance(self.wake)
                self.position = step.index, layer
                experts = step.experts[layer].tolist()
                time = access_time(step.index, layer, num_layers, workload.top_k)
                if ahead is not None:
                    waits, used = ahead[layer]
                else:
                    waits, used = self._demand(step, layer) if looks_up else ([], [])
                self._prefetch(step, layer, time)
                if waits:
                    waited_from = env.now
                    yield self._arrival(waits)
                    while env.now != self.wake[0]:
                        yield timeout_towards(env, self.wake[0])
                    calendar.advance(self.wake)
                    stall += env.now - waited_from
                if repick:  # for this layer's experts and the next layer's attention
                    compute = self._compute(batch)
                pending = compute.experts(experts, step.tokens_per_expert[layer].tolist())
                in_use = used
            started = env.now
            yield self._phase(pending, compute.lm_head())
            self._finish_experts(in_use, started, pending)
            calendar.advance(self.wake)
            self.records.append(StepRecord(
                env.now - start, stall,
                sum(m.demand_hits for m in memories) - hits_before,
                sum(m.demand_misses for m in memories) - misses_before,
                sum(m.demand_in_flight for m in memories) - in_flight_before,
                (0,) * len(PREFETCH_SERIES) if prefetch_before is None else
                tuple(a - b for a, b in zip(prefetch_counts(memories), prefetch_before, strict=True)),
            ))
            if self.progress is not None:
                self.progress(1)
        if self.deferred is not None:  # the run is over: nothing waits for a step that will not come
            for deferred in self.deferred:
                deferred.clear()

    def _demand(self, step, layer: int):
        """Look up (and fetch what is missing of) layer ``layer``'s experts: the transfers to wait for, and the
        (memory, key) pairs to release after the layer's expert compute."""
        memories, future, access = self.memories, self.future, self._access
        num_experts, gpus = self.workload.num_experts, len(memories)
        time = access_time(step.index, layer, self.workload.num_layers, self.workload.top_k)
        access.time, access.layer, access.current_layer, access.step = time, layer, layer, step.index
        # A step that decodes one request serves that request; a batch serves several (no one sequence), and the
        # learned policy sees it as one request with a wider working set. Counting a visit for each request whose
        # token routed to an expert was tried: with weights trained on one token at a time (a clock in tokens, not
        # batched steps) it lowered the learned hit rate on ssd_offload from 0.630 to 0.554 at batch 4.
        access.sequence = int(step.sequence_ids[0]) if len(step.sequence_ids) == 1 else None
        waits, used = [], []
        outcomes = ([], [], []) if self.tells_demand else None  # hits, in flight, misses
        base = layer * num_experts
        for expert, score in zip(step.experts[layer].tolist(), step.scores[layer].tolist(), strict=True):
            key = base + expert
            access.key, access.score = key, score
            if future is not None:
                access.next_use = future.next_use_after(key, time)
            memory = memories[expert % gpus]
            if outcomes is not None:
                misses_before = memory.demand_misses
            wait = memory.demand(key, access)
            if wait is not None:
                waits.append(wait)
            used.append((memory, key))
            if outcomes is not None:
                outcome = 2 if memory.demand_misses != misses_before else int(wait is not None)
                outcomes[outcome].append(expert)
        if outcomes is not None:
            self.prefetcher.on_demand(DemandEvent(step.index, layer, *map(tuple, outcomes)))
        return waits, used

    def _prefetch(self, step, layer: int, time: int) -> None:
        if self.prefetcher is None:
            return
        event = RoutingEvent(step.index, layer, step.experts[layer], step.scores[layer], step.rows[:, layer, :],
                             step.sequence_ids,
                             None if step.row_scores is None else step.row_scores[:, layer, :],
                             None if step.predicted_experts is None else step.predicted_experts[:, layer, :])
        proposals = self.prefetcher.on_routing(event)
        if not proposals:
            return
        memories, max_queued, budget, deferred = self.memories, self.max_queued, self.budget, self.deferred
        num_experts, num_layers, gpus = self.workload.num_experts, self.workload.num_layers, len(memories)
        last_layer = layer + self.lookahead
        this_step = step.index
        has_next_step = this_step + 1 < len(self.workload.steps)
        issued = 0
        for target_layer, expert in proposals:
            if issued >= budget:
                break
            if not layer < target_layer <= last_layer:
                continue
            target_step = this_step
            if target_layer >= num_layers:  # past the last layer: the next step's, if the run has one
                if not has_next_step:
                    continue
                target_step, target_layer = this_step + 1, target_layer - num_layers
            key = target_layer * num_experts + expert
            memory = memories[expert % gpus]
            if key in memory.resident:  # most proposals: skipped without spending budget
                continue
            blocker = memory.prefetch_blocker(key, max_queued)
            if blocker is None:
                self._start_prefetch(memory, key, target_step, target_layer, this_step, layer, time)
                issued += 1
            elif blocker == "queue" and deferred is not None:
                self._defer(deferred[expert % gpus], key, target_step, target_layer)

    def _start_prefetch(self, memory, key: int, target_step: int, target_layer: int, step: int, layer: int,
                        time: int) -> None:
        """Prefetch ``key`` for ``target_layer`` of ``target_step``, decided while ``layer`` of ``step`` (access
        ``time``) runs."""
        access = self._prefetch_access
        access.key, access.layer, access.time, access.current_layer, access.step = key, target_layer, time, layer, step
        access.sequence = self._access.sequence  # decided while that request's layer runs
        access.next_use = self.future.next_use_after(key, time) if self.future is not None else NEVER
        memory.prefetch_now(key, access, target_step)

    @staticmethod
    def _defer(deferred: deque, key: int, step: int, target_layer: int) -> None:
        if all(entry[0] != key for entry in deferred):
            deferred.append((key, step, target_layer))

    def _offer_deferred(self, gpu: int) -> None:
        """A transfer left GPU ``gpu``'s source queue: start the deferred proposals that now fit, in order, and
        drop those whose layer has already been reached or that can no longer start for another reason. With one
        source every proposal waits for the same queue, so the first one still refused ends the round; with a DDR
        cache those waiting for another queue than the one that drained stay in order and the rest go on."""
        deferred = self.deferred[gpu]
        memory = self.memories[gpu]
        step, layer = self.position
        waiting = []
        while deferred:
            key, target_step, target_layer = deferred[0]
            if (target_step, target_layer) <= (step, layer):
                deferred.popleft()
                continue
            blocker = memory.prefetch_blocker(key, self.max_queued)
            if blocker == "queue":
                if memory.ddr_source is None:
                    break
                waiting.append(deferred.popleft())
                continue
            deferred.popleft()
            if blocker is None:
                self._start_prefetch(memory, key, target_step, target_layer, step, layer,
                                     access_time(step, layer, self.workload.num_layers, self.workload.top_k))
        deferred.extendleft(reversed(waiting))
