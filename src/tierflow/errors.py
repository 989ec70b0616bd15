"""The one exception type that means "the user gave bad input".

The CLI turns a :class:`TierflowError` into a single line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""


class TierflowError(Exception):
    """Bad input: a malformed trace, an unknown name, an impossible setting. The message is one line."""

    def __reduce__(self):
        # Subclasses build their message from other arguments than the message; pickled as message and
        # attributes, an error raised in a worker process reaches the parent as itself.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, attributes):
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(attributes)
    return error


class TraceError(TierflowError):
    """A trace file that is missing, unreadable or does not follow tierflow-trace v1."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
