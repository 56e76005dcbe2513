"""A small trio TCP proxy with one listening port per directed peer link.

Node ``a`` reaches node ``b`` at ``link(a, b).port`` (its ``--peers`` entry for ``b``); the proxy
forwards to ``b``'s real listening address. Raft messages from ``a`` to ``b`` travel as gRPC
requests on connections ``a`` opens to ``b``, so cutting the link ``a -> b`` (both directions of
those TCP connections) cuts exactly the messages ``a`` sends to ``b`` and leaves ``b -> a``
alone: that is a one-way cut. A partition cuts both directed links.

Per link:

* ``cut(mode="blackhole")``: nothing is forwarded any more (existing and new connections
  stall, like a network that drops every packet); on ``heal`` the stalled connections are
  closed (as a TCP timeout would) so no stale bytes are delivered late.
* ``cut(mode="reset")``: existing connections are closed and new ones refused at once.
* ``delay``: seconds added to every chunk, in order (pure latency, not a bandwidth cap).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable

import attrs
import trio

log = logging.getLogger("chaos.proxy")

CHUNK = 65536


@attrs.define(eq=False)
class Link:
    src: str
    dst: str
    port: int = 0
    target: tuple[str, int] = ("127.0.0.1", 0)
    mode: str = "up"  # up | blackhole | reset
    delay: float = 0.0
    conns: set[trio.CancelScope] = attrs.field(factory=set)
    stalled: set[trio.CancelScope] = attrs.field(factory=set)
    opened: trio.Event = attrs.field(factory=trio.Event)
    bytes_forwarded: int = 0

    def __attrs_post_init__(self) -> None:
        self.opened.set()

    @property
    def up(self) -> bool:
        return self.mode == "up"


class Proxy:
    """``async with Proxy() as proxy: port = await proxy.add_link("n1", "n2", ("127.0.0.1",
    7002))``; then ``proxy.cut("n1", "n2")``, ``proxy.heal_all()``..."""

    def __init__(self) -> None:
        self.links: dict[tuple[str, str], Link] = {}
        self._nursery: trio.Nursery | None = None
        self._cm: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None

    async def __aenter__(self) -> Proxy:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._cm is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._cm.__aexit__(None, None, None)

    async def add_link(self, src: str, dst: str, target: tuple[str, int]) -> int:
        """Listen for ``src -> dst`` on a free loopback port; returns the port."""
        assert self._nursery is not None
        link = Link(src, dst, target=target)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        link.port = listeners[0].socket.getsockname()[1]
        self.links[(src, dst)] = link
        self._nursery.start_soon(self._serve, link, listeners)
        return link.port

    async def _serve(self, link: Link, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, link, listener, nursery)

    async def _accept_loop(self, link: Link, listener: trio.SocketListener,
                           nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, link, stream)

    async def _connection(self, link: Link, downstream: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        link.conns.add(scope)
        try:
            with scope:
                async with downstream:
                    if link.mode == "reset":
                        return
                    if link.mode == "blackhole":
                        link.stalled.add(scope)
                        await trio.sleep_forever()
                    try:
                        upstream = await trio.open_tcp_stream(*link.target)
                    except OSError:
                        return
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, link, downstream, upstream, scope)
                        nursery.start_soon(self._pump, link, upstream, downstream, scope)
        finally:
            link.conns.discard(scope)
            link.stalled.discard(scope)

    async def _pump(self, link: Link, src: trio.SocketStream, dst: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def writer() -> None:
            async for due, data in recv:
                now = trio.current_time()
                if due > now:
                    await trio.sleep(due - now)
                await self._gate(link, scope)
                try:
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                link.bytes_forwarded += len(data)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                while True:
                    await self._gate(link, scope)
                    data = await src.receive_some(CHUNK)
                    if not data:
                        break
                    send.send_nowait((trio.current_time() + link.delay, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            # EOF or error: let the writer flush, then close the whole connection.
            send.close()

    async def _gate(self, link: Link, scope: trio.CancelScope) -> None:
        if link.mode == "reset":
            scope.cancel()
            await trio.lowlevel.checkpoint()
            return
        if link.mode == "blackhole":
            link.stalled.add(scope)
            await trio.sleep_forever()

    # -- control ---------------------------------------------------------------------------------
    def cut(self, src: str, dst: str, mode: str = "blackhole") -> None:
        link = self.links.get((src, dst))
        if link is None:
            return
        link.mode = mode
        if mode == "reset":
            for scope in list(link.conns):
                scope.cancel()

    def heal(self, src: str, dst: str) -> None:
        link = self.links.get((src, dst))
        if link is None or link.up:
            return
        link.mode = "up"
        for scope in list(link.stalled):
            scope.cancel()
        link.stalled.clear()

    def set_delay(self, src: str, dst: str, seconds: float) -> None:
        link = self.links.get((src, dst))
        if link is not None:
            link.delay = seconds

    def partition(self, groups: Iterable[Iterable[str]], mode: str = "blackhole") -> None:
        """Cut every link between nodes of different groups (both directions)."""
        sets = [set(g) for g in groups]
        for (src, dst) in self.links:
            gs = next((i for i, g in enumerate(sets) if src in g), None)
            gd = next((i for i, g in enumerate(sets) if dst in g), None)
            if gs is not None and gd is not None and gs != gd:
                self.cut(src, dst, mode)

    def heal_all(self) -> None:
        for (src, dst), link in self.links.items():
            self.heal(src, dst)
            link.delay = 0.0

    def cut_links(self) -> list[tuple[str, str]]:
        return sorted(k for k, link in self.links.items() if not link.up)
