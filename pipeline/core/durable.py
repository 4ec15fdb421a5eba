"""Writes that survive a crash or power loss: fsync the file, rename it into place, fsync the folder.

A rename makes a file visible under its real name; without an fsync before it, a power loss can leave
the new name pointing at a file whose data never reached the disk (a torn file that looks finished).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(path: Path) -> None:
    """Make renames and new entries in a folder durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the files themselves were synced
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Every regular file and folder below `root`, and `root` itself (before `root` is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        fsync_directory(Path(folder))


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write beside the target, fsync, rename over it, fsync the folder: readers see the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    replace_durable(temporary, path)


def replace_durable(source: Path, target: Path) -> None:
    """Rename a finished (already fsync'ed) file or folder into place and make the rename durable."""
    os.replace(source, target)
    fsync_directory(target.parent)
