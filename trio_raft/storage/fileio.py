"""The file-I/O seam: the one object through which the storage layer touches the disk.

Every byte the storage modules write or read, and every create, rename, unlink, directory fsync
and lock they perform, is a call on a :class:`FileIO`. The real implementation,
:class:`OSFileIO`, is a thin shell over :mod:`os` (one method call, no copies, no locks, no
state); :data:`OS_FILE_IO` is its shared instance and the default everywhere. Tests hand the
storage functions another implementation (``trio_raft.testing.faults.FaultyFileIO``) to inject
EIO, ENOSPC, short writes or failed fsyncs, and to see which calls were made.

Rules of the seam
-----------------
* The methods are primitives: each maps to one system call (``rename_noreplace`` to one call, or
  to a check and a rename where the kernel has no no-replace rename). Composite operations
  (write everything, write a file atomically, fsync a directory, create parents) live in
  :mod:`trio_raft.storage.fileutil` and take the seam as a parameter.
* Methods raise :class:`OSError` exactly as :mod:`os` does; turning that into a typed
  :class:`~trio_raft.errors.StorageIOError` that names the file is the caller's job (the seam
  does not know what the caller was doing). ``write`` may write fewer bytes than given and
  returns how many it wrote.
* Paths are ``str``; file descriptors are ``int``. Files are opened with ``O_CLOEXEC`` added.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Final, Protocol

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "OPS",
    "OS_FILE_IO",
    "FileIO",
    "OSFileIO",
]

#: Mode of every directory the storage layer creates.
DIR_MODE: Final = 0o755
#: Mode of every file the storage layer creates.
FILE_MODE: Final = 0o600

#: The names of the seam's methods (what a fault rule or a recorded call names).
OPS: Final = frozenset({
    "open", "close", "write", "readinto", "pread", "fsync", "fdatasync", "ftruncate", "fstat",
    "stat", "flock", "replace", "rename_noreplace", "unlink", "mkdir", "rmdir", "listdir",
})

_fdatasync = getattr(os, "fdatasync", os.fsync)


class FileIO(Protocol):
    """The primitive file operations storage needs. See the module docstring for the rules."""

    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        """``os.open(path, flags | O_CLOEXEC, mode)``: a new file descriptor."""
        ...

    def close(self, fd: int) -> None:
        """Close ``fd``. The descriptor is released even when this raises."""
        ...

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Write some of ``data`` at the file position; returns how many bytes were written."""
        ...

    def readinto(self, fd: int, buffer: bytearray | memoryview) -> int:
        """Read into ``buffer`` from the file position; returns the count (0 at end of file)."""
        ...

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` without moving the file position."""
        ...

    def fsync(self, fd: int) -> None:
        """Flush data and metadata of ``fd`` (a file or a directory) to stable storage."""
        ...

    def fdatasync(self, fd: int) -> None:
        """Flush the data of ``fd`` (and the metadata needed to read it back); ``fsync`` where
        the platform has no ``fdatasync``."""
        ...

    def ftruncate(self, fd: int, length: int) -> None:
        """Cut (or extend) the file to ``length`` bytes."""
        ...

    def fstat(self, fd: int) -> os.stat_result:
        ...

    def stat(self, path: str, *, follow_symlinks: bool = True) -> os.stat_result:
        ...

    def flock(self, fd: int) -> None:
        """Take an exclusive, non-blocking ``flock`` on ``fd``; :class:`BlockingIOError` when
        another open file holds it. A no-op where the platform has no ``flock``."""
        ...

    def replace(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` atomically, replacing ``dst`` if it exists."""
        ...

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``; :class:`FileExistsError` when ``dst`` exists (also a
        dangling symlink). Atomic where the kernel offers it (Linux ``renameat2``, Darwin
        ``renamex_np``); elsewhere an ``lstat`` check, then a rename."""
        ...

    def unlink(self, path: str) -> None:
        ...

    def mkdir(self, path: str, mode: int = DIR_MODE) -> None:
        ...

    def rmdir(self, path: str) -> None:
        ...

    def listdir(self, path: str) -> list[str]:
        ...


class OSFileIO:
    """The real seam: every method is the :mod:`os` call of the same name."""

    __slots__ = ()

    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def readinto(self, fd: int, buffer: bytearray | memoryview) -> int:
        return os.readv(fd, (buffer,))

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        _fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: str, *, follow_symlinks: bool = True) -> os.stat_result:
        return os.stat(path, follow_symlinks=follow_symlinks)

    def flock(self, fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def rename_noreplace(self, src: str, dst: str) -> None:
        if not native_rename_noreplace(src, dst):
            fallback_rename_noreplace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str, mode: int = DIR_MODE) -> None:
        os.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)


#: The shared real seam: the default ``file_io`` of every storage function.
OS_FILE_IO: Final = OSFileIO()


# -- rename without replace -------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # Linux renameat2 flag
_RENAME_EXCL = 0x4  # Darwin renamex_np flag
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL | None:
    """The C library's symbols, as already loaded into this process (no library search, which
    would start a subprocess)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _libc


def native_rename_noreplace(src: str, dst: str) -> bool:
    """Try the kernel's no-replace rename. Returns False (having done nothing) when the
    platform, kernel or file system cannot do it; raises :class:`OSError` (``FileExistsError``
    when ``dst`` exists) when it can and the rename failed."""
    libc = _get_libc()
    if libc is None:
        return False
    bsrc, bdst = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux"):
        func = getattr(libc, "renameat2", None)
        if func is None:
            return False
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        rc = func(_AT_FDCWD, bsrc, _AT_FDCWD, bdst, _RENAME_NOREPLACE)
    elif sys.platform == "darwin":
        func = getattr(libc, "renamex_np", None)
        if func is None:
            return False
        func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = func(bsrc, bdst, _RENAME_EXCL)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def fallback_rename_noreplace(src: str, dst: str) -> None:
    """``lstat`` the destination, then rename: not atomic against a concurrent creator."""
    try:
        os.lstat(dst)
    except FileNotFoundError:
        os.rename(src, dst)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
