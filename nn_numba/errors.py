"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NNError(Exception):
    """A user-facing problem: the message says what is wrong and what to do."""

    exit_code = 1


class CtrlC(BaseException):
    """Ctrl-C outside the training loop, raised by the command's SIGINT handler. Not KeyboardInterrupt, which
    Typer turns into a silent exit; not an Exception, which Numba's compiler could wrap into its own errors."""
