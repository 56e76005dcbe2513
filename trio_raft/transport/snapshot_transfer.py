"""Snapshot payload transfers as trio tasks: landing a received payload, pumping one out.

Both transports use this module; the gRPC transport adds the hand-off between its asyncio loop
and trio (:class:`ChunkPipe`).

Receiving (:func:`land_snapshot`, always in a trio task that the transport owns): with a
:class:`~trio_raft.storage.snapshot_exchange.SnapshotExchange` and a snapshot index above 0, the
payload chunks are written to an :class:`~trio_raft.storage.snapshot_exchange.IncomingSnapshot`
in worker threads, finalized as the ``.fsm`` file, and the handler gets the message whose
``Snapshot.data`` names that file (the sender's descriptor with the local token in it,
:mod:`trio_raft.storage.descriptor`). Without an exchange the payload is collected in
memory (at most :data:`MAX_INLINE_SNAPSHOT_BYTES`) and handed over inline. Whatever ends the
task early (an error, the handler refusing, cancellation) aborts the incoming snapshot,
shielded, before the exception leaves: the spool or the finalized file is removed, nothing is
left open, and nothing half-written was handed to the handler.

Sending (:func:`pump_payload`, in a trio task of the caller): reads the payload in chunks (file
reads in worker threads) and puts them, then ``None``, into a bounded queue that the transport's
sender drains (for the gRPC transport, an asyncio queue: :func:`stream_through_loop`).
Cancelling the caller cancels the pump; the caller closes the payload.

:class:`TransferRegistry` lets ``detach`` cancel every landing task of a transport and wait until
they are gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

import attrs
import crc32c
import trio

from trio_raft.core.messages import Message
from trio_raft.errors import (
    SnapshotMetadataNilError,
    SnapshotPayloadCRCError,
    SnapshotPayloadTooLargeError,
    TransportClosedError,
)
from trio_raft.storage import descriptor
from trio_raft.storage.snapshot_exchange import OutgoingPayload, SnapshotExchange
from trio_raft.transport.base import Handler
from trio_raft.transport.bridge import AsyncioBridge, TrioPortal

log = logging.getLogger(__name__)

#: Largest payload handed to the handler inline (the receiver has no snapshot exchange).
MAX_INLINE_SNAPSHOT_BYTES = 1 << 30

ChunkSource = Callable[[], Awaitable[bytes | None]]


def announced_crc(header: Message) -> int | None:
    """The CRC32C a sender announced in the metadata frame (the token of its descriptor, or its
    bare token, for the same index), or ``None`` (an older sender, or an inline payload)."""
    snap = header.snapshot
    return None if snap is None else descriptor.announced_crc(snap.data, snap.metadata.index)


async def land_snapshot(header: Message, next_chunk: ChunkSource, handler: Handler,
                        exchange: SnapshotExchange | None, *, max_bytes: int) -> int:
    """Receive one payload from ``next_chunk`` (``None`` = complete) and run ``handler`` on the
    finished message; returns the payload size. See the module docstring."""
    snap = header.snapshot
    if snap is None:
        raise SnapshotMetadataNilError("metadata frame carries no snapshot")
    expected = announced_crc(header)
    index = snap.metadata.index
    if exchange is None or index == 0:
        limit = min(max_bytes, MAX_INLINE_SNAPSHOT_BYTES)
        parts: list[bytes] = []
        size = crc = 0
        while (chunk := await next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise SnapshotPayloadTooLargeError(f"{size} bytes > inline limit {limit}")
            crc = crc32c.crc32c(chunk, crc)
            parts.append(chunk)
        if expected is not None and crc != expected:
            raise SnapshotPayloadCRCError(f"index {index}: received {crc:#010x}, sender "
                                          f"announced {expected:#010x}")
        await handler(attrs.evolve(header, snapshot=attrs.evolve(snap, data=b"".join(parts))))
        return size
    incoming = await trio.to_thread.run_sync(exchange.begin_incoming, index)
    log.info("receiving the snapshot at index %d", index)
    try:
        while (chunk := await next_chunk()) is not None:
            if incoming.size + len(chunk) > max_bytes:
                raise SnapshotPayloadTooLargeError(
                    f"{incoming.size + len(chunk)} bytes > limit {max_bytes}")
            await trio.to_thread.run_sync(incoming.write, chunk)
        data = await trio.to_thread.run_sync(incoming.finalize, expected, snap.data)
        log.info("snapshot at index %d landed: %d bytes", index, incoming.size)
        await handler(attrs.evolve(header, snapshot=attrs.evolve(snap, data=data)))
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(incoming.abort)
        raise
    return incoming.size


class InlinePayload:
    """The :class:`~trio_raft.storage.snapshot_exchange.OutgoingPayload` reading interface over
    bytes already in memory (``Snapshot.data`` that is not a token)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0
        self.size = len(data)

    def read(self, n: int) -> bytes:
        out = bytes(self._view[self._pos:self._pos + n])
        self._pos += len(out)
        return out


async def pump_payload(payload: OutgoingPayload | InlinePayload, chunk_bytes: int,
                       put: Callable[[bytes | None], Awaitable[None]]) -> None:
    """Read ``payload`` in chunks of ``chunk_bytes`` and ``put`` each, then ``None``."""
    while True:
        if isinstance(payload, InlinePayload):
            data = payload.read(chunk_bytes)
            await trio.lowlevel.checkpoint()
        else:
            data = await trio.to_thread.run_sync(payload.read, chunk_bytes)
        if not data:
            await put(None)
            return
        await put(data)


async def stream_through_loop(bridge: AsyncioBridge, payload: OutgoingPayload | InlinePayload,
                              chunk_bytes: int,
                              write: Callable[[asyncio.Queue[bytes | None]], Awaitable[None]],
                              ) -> None:
    """Send ``payload`` on the gRPC transport's asyncio loop: it is pumped here, in trio
    (:func:`pump_payload`), into a one-slot asyncio queue that ``write`` (run on the loop)
    drains onto the stream. The first failure of either side cancels the other and is raised."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
    failures: list[Exception] = []

    async def put(item: bytes | None) -> None:
        await bridge.run(queue.put, item)

    async with trio.open_nursery() as nursery:
        async def pump() -> None:
            try:
                await pump_payload(payload, chunk_bytes, put)
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

        async def stream() -> None:
            try:
                await bridge.run(write, queue)
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

        nursery.start_soon(pump)
        nursery.start_soon(stream)
    if failures:
        raise failures[0]


@attrs.define(eq=False)
class _Transfer:
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)


class TransferRegistry:
    """The landing tasks of one transport (trio side only)."""

    def __init__(self) -> None:
        self._active: set[_Transfer] = set()

    def __len__(self) -> int:
        return len(self._active)

    def open(self) -> _Transfer:
        transfer = _Transfer()
        self._active.add(transfer)
        return transfer

    def close(self, transfer: _Transfer) -> None:
        self._active.discard(transfer)
        transfer.done.set()

    async def cancel_all(self) -> None:
        """Cancel every active transfer and wait until each has finished cleaning up."""
        pending = list(self._active)
        for transfer in pending:
            transfer.scope.cancel()
        with trio.CancelScope(shield=True):
            for transfer in pending:
                await transfer.done.wait()


class ChunkPipe:
    """Bounded, ordered hand-off of one stream's payload chunks from the asyncio handler to the
    trio landing task.

    At most :attr:`LIMIT` chunks wait in the pipe; the asyncio side waits for room, so a fast
    sender is slowed to the speed of the disk. ``items``, ``final``, ``wake``, ``scope`` and
    ``aborted`` are touched only in the trio thread; ``pending``, ``room`` and ``dead`` only on
    the loop. Every crossing goes through the portal, in order.
    """

    LIMIT = 2

    def __init__(self, loop: asyncio.AbstractEventLoop, portal: TrioPortal) -> None:
        self._loop = loop
        self._portal = portal
        # trio side
        self.items: collections.deque[bytes] = collections.deque()
        self.final = False
        self.aborted = False
        self.wake: trio.Event | None = None
        self.scope: trio.CancelScope | None = None
        # loop side
        self.pending = 0
        self.room = asyncio.Event()
        self.dead = False

    # -- loop side --------------------------------------------------------------------------------

    async def put(self, data: bytes) -> bool:
        """Hand a chunk over, waiting while the pipe is full. False: the receiver is gone."""
        while self.pending >= self.LIMIT and not self.dead:
            self.room.clear()
            await self.room.wait()
        if self.dead:
            return False
        self.pending += 1
        self._portal.post(self._push, data)
        return True

    def finish(self) -> None:
        """The final chunk has been handed over."""
        self._portal.post(self._finish)

    def abort(self) -> None:
        """Ask the trio side to cancel the landing task (it cleans up, then ends)."""
        with contextlib.suppress(TransportClosedError):
            self._portal.post(self._abort)

    def receiver_done(self, fut: asyncio.Future[None]) -> None:
        self.dead = True
        self.room.set()
        if not fut.cancelled():
            fut.exception()  # retrieved here; the handler re-raises it when it still waits

    def _release(self) -> None:
        self.pending -= 1
        self.room.set()

    # -- trio side --------------------------------------------------------------------------------

    def bind(self, scope: trio.CancelScope) -> None:
        """The landing task's cancel scope (cancelled at once if an abort came first)."""
        self.scope = scope
        if self.aborted:
            scope.cancel()

    async def get(self) -> bytes | None:
        """The next chunk, or ``None`` once the final chunk has been taken."""
        while not self.items:
            if self.final:
                return None
            self.wake = trio.Event()
            await self.wake.wait()
        data = self.items.popleft()
        self._portal.post_to_loop(self._loop, self._release)
        return data

    def _push(self, data: bytes) -> None:
        self.items.append(data)
        if self.wake is not None:
            self.wake.set()

    def _finish(self) -> None:
        self.final = True
        if self.wake is not None:
            self.wake.set()

    def _abort(self) -> None:
        self.aborted = True
        if self.scope is not None:
            self.scope.cancel()
