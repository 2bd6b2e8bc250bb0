"""Durable small-file writes and fsync, shared by the torch-free modules (data, tokenizer) and the checkpoint code.

A rename publishes a file or directory atomically, but only an fsync makes it durable: after a power loss, a renamed
file whose data was never flushed can come back empty. Checkpoint directories are published by
`openk2.checkpoint.publish_dir`, built on these.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk (a rename that publishes it must never point at data still in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (creations, renames) to disk. Best effort: some filesystems and platforms
    cannot open or fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (str: UTF-8) atomically and durably: temp file in the same directory, fsync,
    rename, fsync of the directory. Readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
