"""The one exception type that means "the user gave bad input".

The CLI turns a :class:`TierflowError` into a single line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""


class TierflowError(Exception):
    """Bad input: a malformed trace, an unknown name, an impossible setting. The message is one line."""


class TraceError(TierflowError):
    """A trace file that is missing, unreadable or does not follow tierflow-trace v1."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
