"""The one exception type the CLI turns into a one-line message and a non-zero exit, and `printable`,
which every line shown to the user goes through so that it stays one line on any terminal."""

import re


class NNError(Exception):
    """A user-facing problem: the message says what is wrong and what to do."""

    exit_code = 1


# control characters (a newline, ESC of a terminal escape code), lone surrogates (a file name that is not
# UTF-8 reaches Python as U+DC80..U+DCFF) and the Unicode line separators
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    if "\udc80" <= c <= "\udcff":  # an undecodable byte of a file name: show the byte
        return f"\\x{ord(c) - 0xdc00:02x}"
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(s: object) -> str:
    """str(s) with the characters above escaped as \\n, \\x1b, \\xff (a byte of a non-UTF-8 name), \\ud800:
    it prints as one line, encodes as UTF-8 and cannot drive the terminal."""
    return _UNPRINTABLE.sub(_escape, str(s))
