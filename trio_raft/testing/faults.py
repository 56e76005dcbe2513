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

A :class:`Hold` rule matches calls the same way but, instead of failing the call, blocks it in
the thread that made it (a trio worker thread: storage's blocking calls run there) until the
test calls :meth:`Hold.release`; the call then goes on (or fails, if a ``Fault`` fires on it
too). The test learns that the call was reached from :attr:`Hold.reached` (a
:class:`threading.Event`) or, in trio, by awaiting :meth:`Hold.wait_reached`. That is how a test
keeps a snapshot transfer or a spool write in flight for as long as it needs, with no timing::

    fio = FaultyFileIO()
    hold = fio.add(Hold("write", path="*.spool", after=1))  # the second spool write waits
    ...
    with trio.fail_after(60):
        await hold.wait_reached()
    ...                                                      # close, detach, assert
    hold.release()

Held calls must not outlive the test: :meth:`FaultyFileIO.release_all` (also run on leaving
``with FaultyFileIO(...) as fio:``) releases every hold, also those not reached yet, which then
never block. Release *inside* whatever waits for the held worker thread (a nursery, a
transport's or an engine's close): a nursery that exits on an error waits for its threads
before any ``with`` around it is left. As a backstop, a held call that is not released within
``Hold.timeout`` seconds fails with ``ETIMEDOUT``. A hold reached on the trio thread itself
(nothing could release it) raises :class:`RuntimeError` instead of blocking.

The object is thread-safe (a lock around the rule counters and the call record): the storage
layer may call it from several worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from trio_raft.storage.fileio import DIR_MODE, FILE_MODE, OPS, OS_FILE_IO, FileIO

__all__ = ["Call", "Fault", "FaultyFileIO", "Hold"]

_GLOB_CHARS = frozenset("*?[")
FaultT = TypeVar("FaultT", "Fault", "Hold")


def _to_ops(value: str | Iterable[str]) -> frozenset[str]:
    ops = frozenset((value,) if isinstance(value, str) else value)
    unknown = sorted(ops - OPS)
    if unknown:
        raise ValueError(f"unknown file-I/O operation(s) {unknown}; known: {sorted(OPS)}")
    if not ops:
        raise ValueError("a fault needs at least one operation")
    return ops


def _matches(ops: frozenset[str], pattern: str | None, op: str, paths: tuple[str, ...]) -> bool:
    """Whether a rule of ``ops`` and path ``pattern`` applies to ``op`` on ``paths``."""
    if op not in ops:
        return False
    if pattern is None:
        return True
    if _GLOB_CHARS.intersection(pattern):
        return any(fnmatch.fnmatchcase(p, pattern) for p in paths)
    return any(pattern in p for p in paths)


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
        return _matches(self.ops, self.path, op, paths)

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
    #: The hold that blocked this call before it went on, or None.
    hold: Hold | None = None


@attrs.define(eq=False)
class Hold:
    """A rule of a :class:`FaultyFileIO` that blocks one call until the test releases it.

    ``ops``, ``path`` and ``after`` select the call as for a :class:`Fault`; a hold fires once.
    The held call waits in the thread that made it; :attr:`reached` is set (and every
    :meth:`wait_reached` returns) as soon as it waits, :attr:`call` is that call. After
    :meth:`release` it goes on to the real file system. A hold released before it is reached
    never blocks (it still sets :attr:`reached`: a marker that the call happened).

    * ``timeout``: seconds a held call waits for :meth:`release` before it fails with
      ``OSError(ETIMEDOUT)`` and :attr:`timed_out` is set (a backstop against a test that
      forgot to release; None waits forever).
    """

    ops: frozenset[str] = attrs.field(converter=_to_ops)
    path: str | None = None
    after: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    timeout: float | None = 120.0
    #: Set once a call is held here.
    reached: threading.Event = attrs.field(factory=threading.Event, init=False)
    #: The call held here (None until reached).
    call: Call | None = attrs.field(default=None, init=False)
    #: True when the held call gave up waiting after ``timeout`` seconds.
    timed_out: bool = attrs.field(default=False, init=False)
    _released: threading.Event = attrs.field(factory=threading.Event, init=False)
    _waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = attrs.field(
        factory=list, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def matches(self, op: str, paths: tuple[str, ...]) -> bool:
        return _matches(self.ops, self.path, op, paths)

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Let the held call go on (or, before it is reached, let it pass without waiting).
        Idempotent; callable from any thread."""
        self._released.set()

    async def wait_reached(self) -> None:
        """Return once a call is held here (at once if one already is). Bound it with
        ``trio.fail_after``; cancelling it leaves nothing behind."""
        with self._lock:
            if self.reached.is_set():
                event = None
            else:
                event = trio.Event()
                self._waiters.append((trio.lowlevel.current_trio_token(), event))
        if event is None:
            await trio.lowlevel.checkpoint()
        else:
            await event.wait()

    def block(self, call: Call) -> None:
        """Block ``call`` (in the calling thread) until :meth:`release`; called by
        :class:`FaultyFileIO`."""
        with self._lock:
            self.call = call
            self.reached.set()
            waiters, self._waiters = self._waiters, []
        for token, event in waiters:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)
        if self._released.is_set():
            return
        if trio.lowlevel.in_trio_run():
            raise RuntimeError(f"a Hold on {call.op} {call.path} was reached on the trio thread, "
                               "where nothing could release it (run the call in a worker thread)")
        if not self._released.wait(self.timeout):
            self.timed_out = True
            raise OSError(errno.ETIMEDOUT, "held file operation was never released", call.path)


@attrs.define(eq=False)
class _RuleState:
    rule: Fault | Hold
    seen: int = 0
    fired: int = 0


@attrs.define(eq=False)
class FaultyFileIO:
    """A :class:`~trio_raft.storage.fileio.FileIO` that applies the :class:`Fault` and
    :class:`Hold` rules given (or :meth:`add`-ed later) and records every call. See the module
    docstring. Leaving ``with FaultyFileIO(...) as fio:`` releases every hold."""

    faults: Iterable[Fault | Hold] = attrs.field(default=(), converter=tuple)
    inner: FileIO = attrs.field(default=OS_FILE_IO, kw_only=True)
    calls: list[Call] = attrs.field(factory=list, init=False)
    _rules: list[_RuleState] = attrs.field(factory=list, init=False)
    _paths: dict[int, str] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        self._rules = [_RuleState(rule) for rule in self.faults]

    # -- rules and the record --------------------------------------------------------------
    def add(self, rule: FaultT) -> FaultT:
        """Arm another rule (it counts calls from now on); returns it."""
        with self._lock:
            self._rules.append(_RuleState(rule))
        return rule

    def clear(self) -> None:
        """Disarm every rule and release every hold (the call record is kept)."""
        self.release_all()
        with self._lock:
            self._rules.clear()

    def release_all(self) -> None:
        """Release every hold armed here, reached or not (those not reached never block)."""
        with self._lock:
            holds = [r.rule for r in self._rules if isinstance(r.rule, Hold)]
        for hold in holds:
            hold.release()

    def __enter__(self) -> FaultyFileIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()

    def fired(self, fault: Fault | None = None) -> list[Call]:
        """The calls on which ``fault`` (any rule, when None) fired."""
        with self._lock:
            return [c for c in self.calls
                    if c.fault is not None and (fault is None or c.fault is fault)]

    def held(self, hold: Hold | None = None) -> list[Call]:
        """The calls ``hold`` (any hold, when None) blocked."""
        with self._lock:
            return [c for c in self.calls
                    if c.hold is not None and (hold is None or c.hold is hold)]

    def calls_to(self, op: str, path: str | None = None) -> list[Call]:
        """The recorded calls of ``op`` (on paths containing ``path``, when given)."""
        with self._lock:
            return [c for c in self.calls
                    if c.op == op and (path is None or path in c.path or path in c.target)]

    def _check(self, op: str, path: str, target: str = "", nbytes: int | None = None
               ) -> Fault | None:
        """Record the call, hold it if a hold is due (outside the lock), and return the fault
        to inject, if one is due."""
        paths = (path, target) if target else (path,)
        with self._lock:
            due_fault: _RuleState | None = None
            due_hold: _RuleState | None = None
            for state in self._rules:
                rule = state.rule
                if not rule.matches(op, paths):
                    continue
                state.seen += 1
                if state.seen <= rule.after:
                    continue
                if isinstance(rule, Hold):
                    if due_hold is None and state.fired == 0:
                        due_hold = state
                elif due_fault is None and (rule.repeat or state.fired == 0):
                    due_fault = state
            fault: Fault | None = None
            hold: Hold | None = None
            if due_fault is not None:
                due_fault.fired += 1
                assert isinstance(due_fault.rule, Fault)
                fault = due_fault.rule
            if due_hold is not None:
                due_hold.fired += 1
                assert isinstance(due_hold.rule, Hold)
                hold = due_hold.rule
            call = Call(op, path, target, nbytes, fault, hold)
            self.calls.append(call)
        if hold is not None:
            hold.block(call)
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
