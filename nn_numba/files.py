"""Atomic file writes, for checkpoints and a run's text files alike: a reader, a crash or a power cut sees
either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import NNError


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
