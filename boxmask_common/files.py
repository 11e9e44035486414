"""Atomic writes (a file is either its old content or its complete new one, never a cut copy) and the one safe
checkpoint load (``weights_only=True``: a file that would unpickle code is refused)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, one_line


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden temporary sibling of ``path`` to write; when the block ends normally it is synced and renamed
    over ``path``, when it raises (Ctrl-C included) it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``UserError`` naming the file when it is missing or
    cannot (or may not) be loaded. ``what`` names the file's kind in the message."""
    import torch

    if not Path(path).is_file():
        raise UserError(path, f"{what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or unsafe files
        raise UserError(path, f"refused: cannot load the {what} with weights_only=True; it may be cut short or carry "
                              f"a pickle payload ({one_line(exc, limit=200)})") from None
