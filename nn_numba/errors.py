"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NNError(Exception):
    """A user-facing problem: the message says what is wrong and what to do."""

    exit_code = 1
