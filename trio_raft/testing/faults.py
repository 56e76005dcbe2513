"""Fault injection for the storage layer's file-I/O seam (:mod:`trio_raft.storage.fileio`).

:class:`FaultyFileIO` is a :class:`~trio_raft.storage.fileio.FileIO` for tests. It passes every
call to a real seam (``inner``, the OS one by default), so the files are real, except where one
of its :class:`Fault` rules says otherwise: then the call fails with an :class:`OSError` of the
rule's ``errno`` (EIO, ENOSPC, ...) without reaching the disk, or, for a ``write`` rule with
``short_write=N``, only the first N bytes are written and N is returned (as a kernel does when
the disk fills up mid-write). It records every call it saw (:attr:`FaultyFileIO.calls`) so a test
can assert what storage did, in what order, and that it did *not* retry a failed fsync.

Rules, in the order given, each count the calls they match (operation and path); a rule fires on
the matching call after its first ``after`` ones, once, or on every matching call from then on
(``repeat=True``). When several rules are due on one call the first fires; all of them count it.

Example: fail the first ``fdatasync`` of any WAL segment with EIO, then watch the WAL refuse::

    fio = FaultyFileIO([Fault("fdatasync", path="*.wal")])
    wal = WAL.create(dir, file_io=fio)
    with pytest.raises(WALIOError):
        wal.save(hs, entries)

The object is thread-safe (a lock around the rule counters and the call record): the storage
layer may call it from several worker threads.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from trio_raft.storage.fileio import DIR_MODE, FILE_MODE, OPS, OS_FILE_IO, FileIO

__all__ = ["Call", "Fault", "FaultyFileIO"]

_GLOB_CHARS = frozenset("*?[")


def _to_ops(value: str | Iterable[str]) -> frozenset[str]:
    ops = frozenset((value,) if isinstance(value, str) else value)
    unknown = sorted(ops - OPS)
    if unknown:
        raise ValueError(f"unknown file-I/O operation(s) {unknown}; known: {sorted(OPS)}")
    if not ops:
        raise ValueError("a fault needs at least one operation")
    return ops


def _check_short_write(inst: Fault, _attr: attrs.Attribute[int | None], value: int | None
                       ) -> None:
    if value is None:
        return
    if inst.ops != frozenset({"write"}):
        raise ValueError("short_write applies to the 'write' operation only")
    if value < 1:
        raise ValueError(f"short_write must be at least 1 byte, not {value}")


@attrs.frozen
class Fault:
    """One fault rule of a :class:`FaultyFileIO`.

    * ``ops``: the seam operation(s) it applies to: a name of
      :data:`~trio_raft.storage.fileio.OPS` ("write", "fsync", "fdatasync", "replace", "open",
      ...) or several.
    * ``path``: which files. None matches every call; a pattern with ``*``, ``?`` or ``[`` is a
      glob matched against the whole path (``"*.wal"``, ``"*/fsm-snap/*.fsm.tmp"``); anything
      else is a substring of the path. Calls on a descriptor match the path it was opened with;
      ``replace`` and ``rename_noreplace`` match on either path.
    * ``after``: how many matching calls pass before the rule fires (0: the first one fails).
    * ``repeat``: False fires once; True fires on every matching call from then on.
    * ``error``: the ``errno`` of the :class:`OSError` raised (EIO by default; ENOSPC, ...).
    * ``short_write``: only with ``ops="write"``: instead of failing, write the first
      ``short_write`` bytes (at least 1) and return that count.
    """

    ops: frozenset[str] = attrs.field(converter=_to_ops)
    path: str | None = None
    after: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    repeat: bool = False
    error: int = errno.EIO
    short_write: int | None = attrs.field(default=None, validator=_check_short_write)

    def matches(self, op: str, paths: tuple[str, ...]) -> bool:
        if op not in self.ops:
            return False
        if self.path is None:
            return True
        if _GLOB_CHARS.intersection(self.path):
            return any(fnmatch.fnmatchcase(p, self.path) for p in paths)
        return any(self.path in p for p in paths)

    def os_error(self, path: str | None = None) -> OSError:
        """The error this rule raises (with ``path`` as its file name, when given)."""
        if path is None:
            return OSError(self.error, os.strerror(self.error))
        return OSError(self.error, os.strerror(self.error), path)


@attrs.frozen
class Call:
    """One call a :class:`FaultyFileIO` saw."""

    op: str
    #: The path, or for a descriptor the path it was opened with ("" if unknown).
    path: str
    #: The second path of ``replace`` / ``rename_noreplace`` ("" otherwise).
    target: str = ""
    #: Bytes asked for by ``write`` (None for other operations).
    nbytes: int | None = None
    #: The rule that fired on this call, or None when the call went through untouched.
    fault: Fault | None = None


@attrs.define(eq=False)
class _RuleState:
    fault: Fault
    seen: int = 0
    fired: int = 0


@attrs.define(eq=False)
class FaultyFileIO:
    """A :class:`~trio_raft.storage.fileio.FileIO` that injects the :class:`Fault` rules given
    (or :meth:`add`-ed later) and records every call. See the module docstring."""

    faults: Iterable[Fault] = attrs.field(default=(), converter=tuple)
    inner: FileIO = attrs.field(default=OS_FILE_IO, kw_only=True)
    calls: list[Call] = attrs.field(factory=list, init=False)
    _rules: list[_RuleState] = attrs.field(factory=list, init=False)
    _paths: dict[int, str] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        self._rules = [_RuleState(f) for f in self.faults]

    # -- rules and the record --------------------------------------------------------------
    def add(self, fault: Fault) -> Fault:
        """Arm another rule (it counts calls from now on); returns it."""
        with self._lock:
            self._rules.append(_RuleState(fault))
        return fault

    def clear(self) -> None:
        """Disarm every rule (the call record is kept)."""
        with self._lock:
            self._rules.clear()

    def fired(self, fault: Fault | None = None) -> list[Call]:
        """The calls on which ``fault`` (any rule, when None) fired."""
        with self._lock:
            return [c for c in self.calls
                    if c.fault is not None and (fault is None or c.fault is fault)]

    def calls_to(self, op: str, path: str | None = None) -> list[Call]:
        """The recorded calls of ``op`` (on paths containing ``path``, when given)."""
        with self._lock:
            return [c for c in self.calls
                    if c.op == op and (path is None or path in c.path or path in c.target)]

    def _check(self, op: str, path: str, target: str = "", nbytes: int | None = None
               ) -> Fault | None:
        paths = (path, target) if target else (path,)
        with self._lock:
            due: _RuleState | None = None
            for rule in self._rules:
                if not rule.fault.matches(op, paths):
                    continue
                rule.seen += 1
                if (due is None and rule.seen > rule.fault.after
                        and (rule.fault.repeat or rule.fired == 0)):
                    due = rule
            fault = None
            if due is not None:
                due.fired += 1
                fault = due.fault
            self.calls.append(Call(op, path, target, nbytes, fault))
            return fault

    def _fd_path(self, fd: int) -> str:
        return self._paths.get(fd, "")

    # -- the seam ----------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        fault = self._check("open", path)
        if fault is not None:
            raise fault.os_error(path)
        fd = self.inner.open(path, flags, mode)
        with self._lock:
            self._paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        fault = self._check("close", self._fd_path(fd))
        with self._lock:
            self._paths.pop(fd, None)
        self.inner.close(fd)  # a failed close still releases the descriptor
        if fault is not None:
            raise fault.os_error()

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        fault = self._check("write", self._fd_path(fd), nbytes=len(data))
        if fault is None:
            return self.inner.write(fd, data)
        if fault.short_write is not None:
            return self.inner.write(fd, memoryview(data)[: fault.short_write])
        raise fault.os_error()

    def readinto(self, fd: int, buffer: bytearray | memoryview) -> int:
        fault = self._check("readinto", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        return self.inner.readinto(fd, buffer)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        fault = self._check("pread", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        return self.inner.pread(fd, size, offset)

    def fsync(self, fd: int) -> None:
        fault = self._check("fsync", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        fault = self._check("fdatasync", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        self.inner.fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        fault = self._check("ftruncate", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        self.inner.ftruncate(fd, length)

    def fstat(self, fd: int) -> os.stat_result:
        fault = self._check("fstat", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        return self.inner.fstat(fd)

    def stat(self, path: str, *, follow_symlinks: bool = True) -> os.stat_result:
        fault = self._check("stat", path)
        if fault is not None:
            raise fault.os_error(path)
        return self.inner.stat(path, follow_symlinks=follow_symlinks)

    def flock(self, fd: int) -> None:
        fault = self._check("flock", self._fd_path(fd))
        if fault is not None:
            raise fault.os_error()
        self.inner.flock(fd)

    def replace(self, src: str, dst: str) -> None:
        fault = self._check("replace", src, dst)
        if fault is not None:
            raise fault.os_error(src)
        self.inner.replace(src, dst)

    def rename_noreplace(self, src: str, dst: str) -> None:
        fault = self._check("rename_noreplace", src, dst)
        if fault is not None:
            raise fault.os_error(src)
        self.inner.rename_noreplace(src, dst)

    def unlink(self, path: str) -> None:
        fault = self._check("unlink", path)
        if fault is not None:
            raise fault.os_error(path)
        self.inner.unlink(path)

    def mkdir(self, path: str, mode: int = DIR_MODE) -> None:
        fault = self._check("mkdir", path)
        if fault is not None:
            raise fault.os_error(path)
        self.inner.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        fault = self._check("rmdir", path)
        if fault is not None:
            raise fault.os_error(path)
        self.inner.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        fault = self._check("listdir", path)
        if fault is not None:
            raise fault.os_error(path)
        return self.inner.listdir(path)


if TYPE_CHECKING:  # FaultyFileIO must stay a complete seam
    _SEAM: FileIO = FaultyFileIO()
