"""Shared helpers for the transport tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_raft.core.messages import Entry, Message, MessageType
from trio_raft.storage.snapshot_exchange import SnapshotExchange
from trio_raft.transport import GRPCTransport, TransportPeer


def app(index: int, n_entries: int = 1, size: int = 100, to: int = 2) -> Message:
    return Message(
        MessageType.APP, to=to, from_=1, term=3, log_term=3, index=index, commit=index,
        entries=tuple(Entry(3, index + 1 + i, data=bytes([i % 256]) * size)
                      for i in range(n_entries)),
    )


class Inbox:
    """A handler recording what it receives; can be told to fail."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.fail_with: BaseException | None = None
        self.arrived = trio.Event()
        self.hook: Callable[[Message], Awaitable[None]] | None = None

    async def __call__(self, message: Message) -> None:
        if self.hook is not None:
            await self.hook(message)
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.append(message)
        self.arrived.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while len(self.messages) < n:
                await trio.sleep(0.005)


@asynccontextmanager
async def grpc_pair(**kwargs: Any) -> AsyncIterator[tuple[GRPCTransport, GRPCTransport, Inbox]]:
    """Transport ``a`` (node 1) knowing ``b`` (node 2, with an Inbox handler), both serving.
    ``a_snapshots`` / ``b_snapshots``: the snapshot exchanges attached to each side."""
    a_kwargs = kwargs.pop("a_kwargs", {})
    b_kwargs = kwargs.pop("b_kwargs", {})
    a_snapshots: SnapshotExchange | None = kwargs.pop("a_snapshots", None)
    b_snapshots: SnapshotExchange | None = kwargs.pop("b_snapshots", None)
    a = GRPCTransport(**{**kwargs, **a_kwargs})
    b = GRPCTransport(**{**kwargs, **b_kwargs})
    inbox = Inbox()
    b.attach(inbox, b_snapshots)
    if a_snapshots is not None:
        a.attach(Inbox(), a_snapshots)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve, "127.0.0.1", 0)
        port_b = await nursery.start(b.serve, "127.0.0.1", 0)
        a.upsert_peer(TransportPeer(2, "n2", f"127.0.0.1:{port_b}"))
        try:
            yield a, b, inbox
        finally:
            await a.aclose()
            await b.aclose()


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()
