"""The one exception type the CLI turns into a single line and a nonzero exit."""


class MkdError(Exception):
    """A user-facing problem with input, a file or a setting.

    The message names the file (when there is one) and the problem in one line; the CLI prints
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def fail(path, problem):
    """Raise an :class:`MkdError` naming ``path`` and ``problem``."""
    raise MkdError(f"{path}: {problem}")
