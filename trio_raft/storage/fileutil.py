"""Durable-file helpers built on the file-I/O seam (:mod:`trio_raft.storage.fileio`).

Everything here blocks, and every disk access goes through the ``file_io`` it is given (the real
seam by default). The rules it owns:

* A file that must survive a crash is written under a temporary name in the same directory,
  fsynced, renamed into place, and then the directory is fsynced so the rename itself is durable
  (:func:`replace_file`). When any step fails the temporary file is removed and the previous
  file is left as it was: nothing half-written is ever renamed into place.
* Helpers that work on a *path* raise :class:`~trio_raft.errors.StorageIOError` naming the
  operation and the file, with the :class:`OSError` as ``__cause__``. Helpers that work on a
  bare file descriptor (:func:`write_all`, :func:`pread_exact`) raise the :class:`OSError`
  itself: only the caller knows which file it is.
* A failed fsync is never retried here: the error goes up and the operation counts as failed.
* Directories are created with mode 0o755, files with 0o600.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator

from trio_raft.errors import StorageIOError
from trio_raft.storage.fileio import DIR_MODE, FILE_MODE, OS_FILE_IO, FileIO

log = logging.getLogger(__name__)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "close_quietly",
    "commit_temp_file",
    "create_temp_file",
    "datasync",
    "discard_temp_file",
    "fsync_dir",
    "io_errors",
    "is_dir",
    "lexists",
    "listdir_if_exists",
    "make_dirs",
    "pread_exact",
    "read_file",
    "read_file_if_exists",
    "remove_stale_temp_files",
    "remove_tree",
    "rename",
    "replace_file",
    "unlink_if_exists",
    "write_all",
]

#: The real seam's ``fdatasync`` (``fsync`` where the platform lacks it); for code outside the
#: storage layer that measures the disk (bench/wal_bench.py).
datasync = OS_FILE_IO.fdatasync

_TEMP_ATTEMPTS = 100


@contextlib.contextmanager
def io_errors(op: str, path: str, context: str = "") -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a :class:`StorageIOError`."""
    try:
        yield
    except OSError as exc:
        raise StorageIOError.from_os_error(op, path, exc, context) from exc


# -- descriptor helpers (raise OSError) -------------------------------------------------------


def write_all(fd: int, data: bytes | bytearray | memoryview, *,
              file_io: FileIO = OS_FILE_IO) -> None:
    """Write every byte of ``data``, continuing after short writes.

    A write that makes no progress raises ``OSError(EIO)`` instead of looping.
    """
    n = file_io.write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        n = file_io.write(fd, view)
        view = view[n:]


def pread_exact(fd: int, size: int, offset: int, *, file_io: FileIO = OS_FILE_IO) -> bytes:
    """Exactly ``size`` bytes at ``offset``; :class:`EOFError` if the file is shorter."""
    first = file_io.pread(fd, size, offset)
    if len(first) == size:
        return first
    parts = [first]
    got = len(first)
    while got < size:
        chunk = file_io.pread(fd, size - got, offset + got)
        if not chunk:
            raise EOFError(f"{size - got} byte(s) missing at offset {offset + got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def close_quietly(fd: int, path: str, *, file_io: FileIO = OS_FILE_IO) -> None:
    """Close a descriptor whose close cannot lose anything (opened only for reading, already
    fsynced, or on an error path that is already raising): a failure is logged, not raised."""
    try:
        file_io.close(fd)
    except OSError as exc:
        log.warning("closing %s failed: %s", path, exc)


# -- path helpers (raise StorageIOError) --------------------------------------------------------


def fsync_dir(path: str | os.PathLike[str], *, file_io: FileIO = OS_FILE_IO) -> None:
    """fsync a directory so that creates, renames and unlinks in it are durable."""
    path = os.fspath(path)
    with io_errors("open", path):
        fd = file_io.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with io_errors("fsync", path):
            file_io.fsync(fd)
    except BaseException:
        close_quietly(fd, path, file_io=file_io)
        raise
    with io_errors("close", path):
        file_io.close(fd)


def is_dir(path: str, *, file_io: FileIO = OS_FILE_IO) -> bool:
    """True when ``path`` is a directory (symlinks followed); False when it does not exist."""
    try:
        st = file_io.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StorageIOError.from_os_error("stat", path, exc) from exc
    return stat.S_ISDIR(st.st_mode)


def lexists(path: str, *, file_io: FileIO = OS_FILE_IO) -> bool:
    """True when anything (also a dangling symlink) is at ``path``."""
    try:
        file_io.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StorageIOError.from_os_error("stat", path, exc) from exc
    return True


def make_dirs(path: str | os.PathLike[str], *, file_io: FileIO = OS_FILE_IO) -> None:
    """Create ``path`` (and parents) if missing, fsyncing the parent of each new directory."""
    path = os.path.abspath(os.fspath(path))
    if is_dir(path, file_io=file_io):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent, file_io=file_io)
    try:
        file_io.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not is_dir(path, file_io=file_io):
            raise StorageIOError(f"mkdir {path} failed: it exists and is not a directory"
                                 ) from None
    except OSError as exc:
        raise StorageIOError.from_os_error("mkdir", path, exc) from exc
    fsync_dir(parent, file_io=file_io)


def listdir_if_exists(path: str, *, file_io: FileIO = OS_FILE_IO) -> list[str]:
    """The names in directory ``path``; an empty list when it does not exist."""
    try:
        return file_io.listdir(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageIOError.from_os_error("listdir", path, exc) from exc


def unlink_if_exists(path: str, *, file_io: FileIO = OS_FILE_IO) -> bool:
    """Remove ``path``; False when it was already gone."""
    try:
        file_io.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageIOError.from_os_error("unlink", path, exc) from exc
    return True


def remove_tree(path: str, *, file_io: FileIO = OS_FILE_IO) -> None:
    """Delete ``path`` and everything under it (symlinks are removed, never followed).

    A missing ``path`` is fine. Not fsynced: the caller fsyncs the parent when it matters.
    """
    try:
        st = file_io.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageIOError.from_os_error("stat", path, exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        unlink_if_exists(path, file_io=file_io)
        return
    for name in listdir_if_exists(path, file_io=file_io):
        remove_tree(os.path.join(path, name), file_io=file_io)
    try:
        file_io.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageIOError.from_os_error("rmdir", path, exc) from exc


def rename(src: str, dst: str, *, file_io: FileIO = OS_FILE_IO) -> None:
    """Rename ``src`` to ``dst`` (replacing a file, or an empty directory, at ``dst``). Not
    fsynced: the caller fsyncs the directory."""
    with io_errors("rename", f"{src} -> {dst}"):
        file_io.replace(src, dst)


def read_file(path: str, *, file_io: FileIO = OS_FILE_IO) -> bytes:
    """The whole content of ``path`` (:class:`StorageIOError` also when it is missing)."""
    data = read_file_if_exists(path, file_io=file_io)
    if data is None:
        raise StorageIOError.from_os_error(
            "open", path, FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path))
    return data


def read_file_if_exists(path: str, *, file_io: FileIO = OS_FILE_IO) -> bytes | None:
    """The whole content of ``path``, or None when there is no such file."""
    try:
        fd = file_io.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageIOError.from_os_error("open", path, exc) from exc
    try:
        with io_errors("read", path):
            # The first read asks for one byte more than the file holds, so a file that did
            # not grow is read in one call and the second returns 0 (end of file).
            want = file_io.fstat(fd).st_size + 1
            parts: list[bytearray] = []
            while True:
                chunk = bytearray(want)
                n = file_io.readinto(fd, chunk)
                if n == 0:
                    break
                del chunk[n:]
                parts.append(chunk)
                want = max(want, 1 << 16)
    finally:
        close_quietly(fd, path, file_io=file_io)
    return b"".join(parts)


def create_temp_file(directory: str, prefix: str, suffix: str = "", *, readable: bool = False,
                     file_io: FileIO = OS_FILE_IO) -> tuple[int, str]:
    """Create a new, empty file ``<prefix><random><suffix>`` (mode 0o600) open for writing
    (and reading, when ``readable``)."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    for _ in range(_TEMP_ATTEMPTS):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return file_io.open(path, flags, FILE_MODE), path
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageIOError.from_os_error("create", path, exc) from exc
    raise StorageIOError(f"create {directory}/{prefix}*{suffix} failed: no free name")


def replace_file(path: str | os.PathLike[str], data: bytes, *,
                 file_io: FileIO = OS_FILE_IO) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, directory fsync.

    The temporary file is ``<name>.tmp-<random>``. On any error it is removed and ``path`` keeps
    its previous content (a failure of the final directory fsync is reported too, but by then
    the new content is in place and may or may not survive a crash).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = create_temp_file(directory, os.path.basename(path) + ".tmp-", file_io=file_io)
    commit_temp_file(fd, tmp, path, data, file_io=file_io)


def commit_temp_file(fd: int, tmp: str, path: str, data: bytes | bytearray, *,
                     file_io: FileIO = OS_FILE_IO) -> None:
    """Write ``data`` to the new temporary file ``tmp`` (open as ``fd``, which this closes),
    fsync it, rename it to ``path`` and fsync the directory.

    On an error before the rename, ``tmp`` is removed and ``path`` is untouched.
    """
    try:
        try:
            with io_errors("write", tmp):
                write_all(fd, data, file_io=file_io)
            with io_errors("fsync", tmp):
                file_io.fsync(fd)
        except BaseException:
            close_quietly(fd, tmp, file_io=file_io)
            raise
        with io_errors("close", tmp):
            file_io.close(fd)
        with io_errors("rename", f"{tmp} -> {path}"):
            file_io.replace(tmp, path)
    except BaseException:
        discard_temp_file(tmp, file_io=file_io)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)), file_io=file_io)


def discard_temp_file(path: str, *, file_io: FileIO = OS_FILE_IO) -> None:
    """Remove a temporary file on an error path. A failure is logged, not raised (the error
    being handled matters more; the cleanup at the next open removes the file)."""
    try:
        file_io.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("removing temporary file %s failed: %s", path, exc)


def remove_stale_temp_files(directory: str, base_name: str, *,
                            file_io: FileIO = OS_FILE_IO) -> list[str]:
    """Delete ``<base_name>.tmp-*`` leftovers of :func:`replace_file` in ``directory``."""
    removed: list[str] = []
    for name in listdir_if_exists(directory, file_io=file_io):
        if name.startswith(base_name + ".tmp-"):
            unlink_if_exists(os.path.join(directory, name), file_io=file_io)
            removed.append(name)
    if removed:
        log.info("removed stale temporary files in %s: %s", directory, removed)
        fsync_dir(directory, file_io=file_io)
    return removed
