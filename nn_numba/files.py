"""Opening an input file: regular files only, so that no reader waits forever on a FIFO or reads an endless
device such as /dev/zero, and every reader knows the real size before it reads a byte.
"""

import errno
import os
import stat
from typing import BinaryIO


class NotAFileError(OSError):
    """A FIFO, socket or device where a regular file is needed; str() says which."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike) -> tuple[BinaryIO, int]:
    """(binary file, its size in bytes) for a regular file; symlinks are followed.

    Raises FileNotFoundError, IsADirectoryError, NotAFileError or another OSError. O_NONBLOCK makes the
    open of a FIFO return at once (instead of waiting for a writer) so that fstat can refuse it; it has no
    effect on regular files."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
            raise NotAFileError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise
