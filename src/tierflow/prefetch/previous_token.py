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
            target = event.layer + ahead  # past the last layer: the next step's, which this step has routed
            proposals += [(target, expert) for expert in self._last.get(target % self.context.num_layers, ())]
        return proposals
