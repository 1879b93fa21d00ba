"""`nn-numba configs`: the configs that ship with the package (nn_numba/configs/): list, print, copy.

`nn-numba train NAME` loads them by name from any folder (config.load_config); this module only shows
them and copies one to a path to start a recipe of one's own from.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import SHIPPED, shipped_names
from .errors import NNError


def shipped_path(name: str) -> Path:
    """nn_numba/configs/NAME.toml; an unknown name is a one-line NNError listing the known ones."""
    if name not in shipped_names():
        raise NNError(f"no shipped config named {name!r}: one of {', '.join(shipped_names())}")
    return SHIPPED / f"{name}.toml"


def summary(name: str) -> str:
    """The config's opening comment, in one line (empty if it has none)."""
    lines = []
    for line in shipped_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def listing() -> str:
    """One line per shipped config: its name and what its opening comment says."""
    width = max(len(n) for n in shipped_names())
    rows = [f"{n:<{width}}  {summary(n)}" for n in shipped_names()]
    return "\n".join(rows + ["", "Train one with `nn-numba train NAME`; print it with `nn-numba configs NAME`, "
                                 "copy it with `nn-numba configs NAME --to FILE`."])


def copy(name: str, to: str | os.PathLike) -> Path:
    """Write the shipped config NAME to `to` (into it as NAME.toml if a folder); never overwrites a file."""
    from .files import write_atomic

    src, dst = shipped_path(name), Path(to)
    if dst.is_dir():
        dst = dst / src.name
    if dst.exists() or dst.is_symlink():
        raise NNError(f"{dst} already exists: choose another path (nothing was written)")
    write_atomic(dst, [src.read_bytes()], what="config")
    return dst
