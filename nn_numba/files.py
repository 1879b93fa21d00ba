"""Files in and out. Reading: regular files only, so that no reader waits forever on a FIFO or reads an
endless device such as /dev/zero, and every reader knows the real size before it reads a byte. Writing:
atomically, for checkpoints and a run's text files alike, so that a reader, a crash or a power cut sees
either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import NNError


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


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview], what: str = "file",
                 error: type[NNError] = NNError) -> None:
    """Write `chunks` to `path`: a temp file in the same folder, fsync, rename, then fsync the folder so
    that the rename itself survives a power cut. A failed write removes the temp file and raises one
    `error` naming `what` and `path`; the previous file is then unchanged. Anything else (a Ctrl-C) is
    re-raised as it is, after the clean-up."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    replaced = False
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:  # incl. a second Ctrl-C: leave no temp file behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        why = e.strerror or str(e)
        if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
            why = "the folder does not exist"
        if replaced:
            raise error(f"{what} {path} was written but its folder could not be synced ({why}); "
                        "check the disk") from None
        raise error(f"cannot save {what} {path}: {why}; the previous file, if any, is unchanged") from None


def write_text_atomic(path: Path, text: str) -> None:
    """`write_atomic` for UTF-8 text."""
    write_atomic(path, [text.encode("utf-8")])
