"""Previous token: expect each layer ahead to use the experts it used at the previous decode step."""

from tierflow.prefetch.base import PREFETCHERS, Prefetcher


@PREFETCHERS.register
class PreviousToken(Prefetcher):
    """Prefetch, for the next layers, the experts they used at the previous decode step."""

    name = "previous_token"

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._last: dict[int, list[int]] = {}  # layer -> experts of the latest step that routed it

    def on_routing(self, event):
        self._last[event.layer] = event.experts.tolist()
        proposals = []
        for ahead in range(1, self.context.lookahead + 1):
            layer = event.layer + ahead
            if layer < self.context.num_layers:
                proposals += [(layer, expert) for expert in self._last.get(layer, ())]
        return proposals
