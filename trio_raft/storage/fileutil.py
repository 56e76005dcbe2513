"""Small durable-file helpers shared by the storage modules.

Everything here blocks. The rules: a file that must survive a crash is written to a temporary
name in the same directory, fsynced, renamed into place, and then the directory is fsynced so the
rename itself is durable (spec d.8). Directories are created with mode 0o755, files with 0o600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

log = logging.getLogger(__name__)

DIR_MODE = 0o755
FILE_MODE = 0o600

#: ``os.fdatasync`` where the platform has it (Linux); ``os.fsync`` elsewhere.
datasync = getattr(os, "fdatasync", os.fsync)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that creates, renames and unlinks in it are durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and parents) if missing, fsyncing the parent of each new directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    make_dirs(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    fsync_dir(parent)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def replace_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, directory fsync.

    The temporary file is ``<name>.tmp-<random>``; it is removed on any error.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_stale_temp_files(directory: str, base_name: str) -> list[str]:
    """Delete ``<base_name>.tmp-*`` leftovers of :func:`replace_file` in ``directory``."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(base_name + ".tmp-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
            removed.append(name)
    if removed:
        log.info("removed stale temporary files in %s: %s", directory, removed)
        fsync_dir(directory)
    return removed
