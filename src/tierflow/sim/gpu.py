"""The GPU compute stream: per decode step, per MoE layer, attention, routing, wait for the layer's experts,
then expert compute. Compute overlaps transfers; a layer stalls only for experts not yet resident.

Compute time is a roofline: ``max(FLOPs / peak, bytes read / HBM bandwidth)`` for each phase. With N GPUs,
attention and dense layers are tensor-parallel (FLOPs and weights split N ways, plus an all-reduce of the
activations over NVLink) and experts are expert-parallel (expert ``e`` lives on GPU ``e mod N``; the busiest
GPU sets the layer's pace, plus the all-to-all that sends tokens to their experts and back).
"""

from __future__ import annotations

from collections import deque

import attrs

from tierflow.cache import NEVER, Access
from tierflow.catalog.hardware import HardwareProfile, Link
from tierflow.catalog.models import ModelSpec
from tierflow.ledger import Ledger
from tierflow.prefetch import RoutingEvent
from tierflow.sim.calendar import timeout_towards
from tierflow.sim.transfer import Arrival

ACTIVATION_BYTES = 2  # BF16 activations exchanged between GPUs


@attrs.frozen
class Phase:
    """One roofline phase: its duration and what it reads and computes (summed over GPUs)."""

    seconds: float
    flops: float
    hbm_read_bytes: float


class ComputeModel:
    """Roofline times of each phase of a decode step for a model on N GPUs of a hardware profile.

    The model's per-token figures are read once; the per-layer work is then plain arithmetic, since it
    runs for every layer of every step. Attention work over the KV cache is linear in the tokens a layer
    attends to (the whole context, or the sliding window).
    """

    def __init__(self, spec: ModelSpec, hardware: HardwareProfile, gpus: int, batch_size: int,
                 hbm_bandwidth_bytes_per_s: float | None = None):
        self.spec, self.gpus, self.batch = spec, gpus, batch_size
        self.peak_flops = hardware.gpu.peak_flops
        self.hbm_bw = hbm_bandwidth_bytes_per_s or hardware.gpu.hbm.read_bandwidth_bytes_per_s
        self.nvlink: Link | None = hardware.nvlink
        self.expert_flops = spec.expert_flops_per_token
        self.expert_bytes = spec.expert_bytes
        context_flops = spec.attention.context_flops_per_token
        self._flops_per_attended = context_flops(2) - context_flops(1)
        self._moe_fixed_flops = (spec.non_expert_flops_per_token_per_moe_layer(1) - self._flops_per_attended)
        self._dense_fixed_flops = (spec.non_expert_flops_per_token_per_dense_layer(1) - self._flops_per_attended)
        self._kv_per_token = spec.kv_bytes_per_token_per_layer
        self._window = {layer: spec.sliding_window_tokens for layer in spec.sliding_window_layers}
        activations = self.batch * spec.hidden_size * ACTIVATION_BYTES
        self._allreduce_s = self._collective_s(activations)
        self._dispatch_s = 2 * self._collective_s(activations * spec.top_k)

    def _roofline(self, flops_per_gpu: float, bytes_per_gpu: float) -> float:
        return max(flops_per_gpu / self.peak_flops, bytes_per_gpu / self.hbm_bw)

    def _collective_s(self, bytes_per_gpu: float) -> float:
        """Ring all-reduce (or all-to-all) of ``bytes_per_gpu`` over NVLink: 2 (N-1)/N of the data each way."""
        if self.gpus == 1 or self.nvlink is None:
            return 0.0
        moved = 2 * (self.gpus - 1) / self.gpus * bytes_per_gpu
        return self.nvlink.latency_s + moved / self.nvlink.bandwidth_bytes_per_s

    def _attention(self, context: int, layer: int, fixed_flops: float, weight_bytes: float) -> Phase:
        attended = min(context, self._window[layer]) if layer in self._window else context
        flops = self.batch * (fixed_flops + self._flops_per_attended * attended)
        read = weight_bytes + self.batch * attended * self._kv_per_token
        n = self.gpus
        return Phase(self._roofline(flops / n, read / n) + self._allreduce_s, flops, read)

    def dense_prefix(self, context: int) -> Phase:
        """The dense layers before the first MoE layer (attention + dense FFN), tensor-parallel."""
        spec = self.spec
        phases = [self._attention(context, layer, self._dense_fixed_flops, spec.non_expert_bytes_per_dense_layer)
                  for layer in range(spec.num_dense_layers)]
        return Phase(sum(p.seconds for p in phases), sum(p.flops for p in phases),
                     sum(p.hbm_read_bytes for p in phases))

    def attention(self, context: int, moe_layer: int) -> Phase:
        """Attention, router and shared experts of one MoE layer, tensor-parallel."""
        return self._attention(context, self.spec.first_moe_layer + moe_layer, self._moe_fixed_flops,
                               self.spec.non_expert_bytes_per_moe_layer)

    def experts(self, experts: list[int], tokens_per_expert: list[int]) -> Phase:
        """Routed experts of one MoE layer, expert-parallel: the busiest GPU sets the time."""
        n = self.gpus
        if n == 1:
            tokens = sum(tokens_per_expert)
            seconds = self._roofline(tokens * self.expert_flops, len(experts) * self.expert_bytes)
            return Phase(seconds, tokens * self.expert_flops, len(experts) * self.expert_bytes)
        # Plain Python: a layer has a handful of experts, too few for numpy to pay off.
        tokens, count = [0] * n, [0] * n
        for expert, routed in zip(experts, tokens_per_expert, strict=True):
            tokens[expert % n] += routed
            count[expert % n] += 1
        busiest = max(self._roofline(t * self.expert_flops, c * self.expert_bytes)
                      for t, c in zip(tokens, count, strict=True))
        return Phase(busiest + self._dispatch_s, sum(tokens) * self.expert_flops, len(experts) * self.expert_bytes)

    def lm_head(self) -> Phase:
        spec, n = self.spec, self.gpus
        flops = self.batch * spec.lm_head_flops_per_token
        read = spec.lm_head_flops_per_token / 2 * spec.non_expert_bytes_per_param
        return Phase(self._roofline(flops / n, read / n), flops, read)


@attrs.define
class StepRecord:
    latency_s: float
    stall_s: float
    hits: int
    misses: int


class FutureIndex:
    """For offline policies: when each key is used next, from the workload's own future."""

    def __init__(self, steps, num_layers: int, num_experts: int):
        self._uses: dict[int, list[int]] = {}
        for step in steps:
            base = step.index * num_layers
            for layer, experts in enumerate(step.experts):
                for expert in experts.tolist():
                    self._uses.setdefault(layer * num_experts + expert, []).append(base + layer)
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

    def __init__(self, env, workload, memories, compute: ComputeModel, prefetcher, ledger: Ledger,
                 context_length: int, lookahead: int, budget_experts: int, max_queued: int,
                 future: FutureIndex | None, progress=None):
        self.env, self.workload, self.memories = env, workload, memories
        self.compute, self.prefetcher, self.ledger = compute, prefetcher, ledger
        self.context_length, self.lookahead, self.budget = context_length, lookahead, budget_experts
        self.max_queued = max_queued
        self.future = future
        self.progress = progress
        self.records: list[StepRecord] = []
        self.calendar = memories[0].calendar  # where the data paths' events wait until the stream looks
        self.wake = None  # the stream's place in the calendar's order when its current timeout ends
        self._prefetch_access = Access(0, 0, prefetch=True)  # reused for every prefetch (policies copy)
        self.position = (-1, -1)  # (step, layer) whose routing the stream has reached
        # Per GPU, proposals refused only because the source queue was full: (key, step, target layer), offered
        # again whenever a transfer leaves that queue; at most a budget's worth, the oldest dropped first.
        self.deferred = None
        if prefetcher is not None and budget_experts > 0:
            self.deferred = [deque(maxlen=budget_experts) for _ in memories]
            for gpu, memory in enumerate(memories):
                if memory.prefetch_source is not None:
                    memory.prefetch_source.dequeue_listeners.append(lambda _channel, gpu=gpu: self._offer_deferred(gpu))
        self.process = env.process(self._run())

    def _phase(self, *phases: Phase):
        """One timeout for phases that run back to back; their work goes to the ledger."""
        seconds = 0.0
        for phase in phases:
            self.ledger.record_compute(phase.flops, phase.hbm_read_bytes)
            seconds += phase.seconds
        self.wake = self.calendar.mark(self.env.now + seconds)  # SimPy's own sum, so the times agree exactly
        return self.env.timeout(seconds)

    def _arrival(self, transfers):
        """A timeout towards the moment the last of ``transfers`` lands (see :func:`timeout_towards`)."""
        self.wake = self.calendar.run_until(Arrival(self.calendar, transfers))
        return timeout_towards(self.env, self.wake[0])

    def _run(self):
        env, calendar, workload, memories = self.env, self.calendar, self.workload, self.memories
        compute, future = self.compute, self.future
        num_layers, num_experts, gpus = workload.num_layers, workload.num_experts, len(memories)
        looks_up = not all(memory.all_resident for memory in memories)
        access = Access(0, 0)  # one record for every demand lookup: policies copy what they keep
        for step in workload.steps:
            start = env.now
            stall = 0.0
            hits_before = sum(m.demand_hits for m in memories)
            misses_before = sum(m.demand_misses for m in memories)
            context = self.context_length + step.index
            access.step = step.index
            # Compute between two routing decisions is one timeout: a layer's expert compute and the next
            # layer's attention run back to back, and nothing is admitted to a cache between them.
            pending = compute.dense_prefix(context)
            for layer in range(num_layers):
                yield self._phase(pending, compute.attention(context, layer))
                calendar.advance(self.wake)
                self.position = step.index, layer
                experts = step.experts[layer].tolist()
                time = step.index * num_layers + layer
                waits, used = [], []
                if looks_up:
                    access.time, access.layer, access.current_layer = time, layer, layer
                    base = layer * num_experts
                    for expert, score in zip(experts, step.scores[layer].tolist(), strict=True):
                        key = base + expert
                        access.key, access.score = key, score
                        if future is not None:
                            access.next_use = future.next_use_after(key, time)
                        memory = memories[expert % gpus]
                        wait = memory.demand(key, access)
                        if wait is not None:
                            waits.append(wait)
                        used.append((memory, key))
                self._prefetch(step, layer, time)
                if waits:
                    waited_from = env.now
                    yield self._arrival(waits)
                    while env.now != self.wake[0]:
                        yield timeout_towards(env, self.wake[0])
                    calendar.advance(self.wake)
                    stall += env.now - waited_from
                pending = compute.experts(experts, step.tokens_per_expert[layer].tolist())
                for memory, key in used:
                    memory.release(key)
            yield self._phase(pending, compute.lm_head())
            calendar.advance(self.wake)
            self.records.append(StepRecord(
                env.now - start, stall,
                sum(m.demand_hits for m in memories) - hits_before,
                sum(m.demand_misses for m in memories) - misses_before,
            ))
            if self.progress is not None:
                self.progress(1)

    def _prefetch(self, step, layer: int, time: int) -> None:
        if self.prefetcher is None:
            return
        event = RoutingEvent(step.index, layer, step.experts[layer], step.scores[layer], step.rows[:, layer, :],
                             step.sequence_ids)
        proposals = self.prefetcher.on_routing(event)
        if not proposals:
            return
        memories, max_queued = self.memories, self.max_queued
        num_experts, gpus = self.workload.num_experts, len(memories)
        last_layer = layer + self.lookahead
        issued = 0
        for target_layer, expert in proposals:
            if issued >= self.budget:
                break
            if not layer < target_layer <= last_layer:
                continue
            key = target_layer * num_experts + expert
            memory = memories[expert % gpus]
            blocker = memory.prefetch_blocker(key, max_queued)
            if blocker is None:
                self._start_prefetch(memory, key, target_layer, step.index, layer, time)
                issued += 1
            elif blocker == "queue" and self.deferred is not None:
                self._defer(self.deferred[expert % gpus], key, step.index, target_layer)

    def _start_prefetch(self, memory, key: int, target_layer: int, step: int, layer: int, time: int) -> None:
        """Prefetch ``key`` for ``target_layer``, decided while ``layer`` of ``step`` (access ``time``) runs."""
        access = self._prefetch_access
        access.key, access.layer, access.time, access.current_layer, access.step = key, target_layer, time, layer, step
        access.next_use = self.future.next_use_after(key, time) if self.future is not None else NEVER
        memory.prefetch_now(key, access)

    @staticmethod
    def _defer(deferred: deque, key: int, step: int, target_layer: int) -> None:
        if all(entry[0] != key for entry in deferred):
            deferred.append((key, step, target_layer))

    def _offer_deferred(self, gpu: int) -> None:
        """A transfer left GPU ``gpu``'s source queue: start the deferred proposals that now fit, in order, and
        drop those whose layer has already been reached or that can no longer start for another reason."""
        deferred = self.deferred[gpu]
        memory = self.memories[gpu]
        step, layer = self.position
        while deferred:
            key, target_step, target_layer = deferred[0]
            if (target_step, target_layer) <= (step, layer):
                deferred.popleft()
                continue
            blocker = memory.prefetch_blocker(key, self.max_queued)
            if blocker == "queue":
                return
            deferred.popleft()
            if blocker is None:
                self._start_prefetch(memory, key, target_layer, step, layer, step * self.workload.num_layers + layer)
