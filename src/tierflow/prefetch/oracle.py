"""Oracle: the experts the trace says layers ahead will use, the upper bound other prefetchers are compared to.

It reads the future from the workload (``context.workload.steps``): at layer ``l`` of step ``s`` it proposes
the experts of layers ``l+1 .. l+lookahead``, nearest layer first, each layer's experts in router order; past
the last layer, those of step ``s + 1``'s first layers (so the next token's first layers can be hidden too).
With ``accuracy`` a < 1 a share 1 - a of each layer's true experts is replaced by experts that layer does not
use (wrong guesses that cost bytes and energy); the choice is a deterministic function of
``(seed, step, layer)``, so a run is reproducible whatever else the engine does. A layer whose step uses n of
its E experts has only E - n unused ones, so it keeps at least 2n - E true experts whatever the accuracy
(Mixtral at batch 16 uses all 8: every guess is right there).
"""

from __future__ import annotations

import attrs
import numpy as np

from tierflow.errors import TierflowError
from tierflow.prefetch.base import PREFETCHERS, Prefetcher
from tierflow.registry import fraction, non_negative


@PREFETCHERS.register
class Oracle(Prefetcher):
    """Prefetch exactly what the next layers will use (reads the trace's future; an upper bound)."""

    name = "oracle"

    @attrs.frozen
    class Params:
        accuracy: float = attrs.field(default=1.0, converter=float, validator=fraction,
                                      metadata={"help": "share of each layer's true experts proposed; the rest "
                                                        "are replaced by wrong ones (at most the experts the "
                                                        "layer does not use)"})
        seed: int | None = attrs.field(default=None, validator=attrs.validators.optional(non_negative), metadata={
            "help": "seed of the wrong guesses; unset: the scenario's seed (a sweep's per-point seeds vary them)"})

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        workload = getattr(self.context, "workload", None)
        if workload is None or not hasattr(workload, "steps"):
            raise TierflowError("prefetcher 'oracle' needs the workload's decode steps (an offline bound)")
        self._steps = workload.steps

    def on_routing(self, event):
        c = self.context
        proposals = []
        for target in range(event.layer + 1, event.layer + c.lookahead + 1):
            index, layer = divmod(target, c.num_layers)  # past the last layer: the next step's
            if event.step + index >= len(self._steps):
                break
            experts = self._guesses(self._steps[event.step + index].experts[layer], event.step + index, layer)
            proposals += [(target, e) for e in experts]
        return proposals

    def _guesses(self, true_experts: np.ndarray, step: int, layer: int) -> list[int]:
        """The layer's true experts with a share 1 - accuracy replaced by unused ones (seeded per step, layer)."""
        accuracy = self.params.accuracy
        if accuracy >= 1.0:
            return true_experts.tolist()
        seed = self.params.seed if self.params.seed is not None else getattr(self.context, "seed", 0)
        rng = np.random.default_rng((seed, step, layer))
        n = len(true_experts)
        # Stochastic rounding keeps the expected replaced share exactly 1 - accuracy for any n.
        wrong = min(int((1.0 - accuracy) * n + rng.random()), n, self.context.num_experts - n)
        guesses = true_experts.copy()
        if wrong:
            unused = np.setdiff1d(np.arange(self.context.num_experts), true_experts, assume_unique=True)
            positions = rng.choice(n, size=wrong, replace=False)
            guesses[positions] = rng.choice(unused, size=wrong, replace=False)
        return guesses.tolist()
