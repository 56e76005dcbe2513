"""Closing the transport's gRPC server while connections are being accepted."""

from __future__ import annotations

import asyncio
import socket

from trio_raft.transport.bridge import AsyncioBridge
from trio_raft.transport.grpc_client import CappedCodec
from trio_raft.transport.grpc_h2server import LimitedServer
from trio_raft.transport.grpc_limits import ServerLimits


def accept_pending() -> bool:
    """asyncio has accepted a connection whose transport its task has not built yet."""
    return any("_accept_connection2" in getattr(t.get_coro(), "__qualname__", "")
               for t in asyncio.all_tasks())


def closed_by_peer(sock: socket.socket) -> bool:
    """Read what the server wrote; True once the server's end is closed."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False  # still open: nothing more to read, no end of stream
    except ConnectionResetError:
        return True
    return True


async def test_a_connection_accepted_as_the_server_stops_is_closed_with_it() -> None:
    # The race of grpc_h2server.LimitedServer.stop_accepting: the connection is accepted, the
    # server stops before asyncio builds its transport. Before the fix its socket stayed open
    # (the transport's construction failed an assertion of asyncio's server) until the garbage
    # collector closed it with a ResourceWarning.
    async def scenario() -> tuple[bool, int, bool]:
        server = LimitedServer([], codec=CappedCodec(1 << 20), limits=ServerLimits(),
                               route_caps={})
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        try:
            for _ in range(1000):
                if accept_pending():
                    break
                await asyncio.sleep(0)
            raced = accept_pending()
            await server.stop_accepting()
            server.close()
            await server.wait_closed()
            return raced, len(server.connections), closed_by_peer(client)
        finally:
            client.close()

    async with AsyncioBridge() as bridge:
        raced, still_open, closed = await bridge.run(scenario)
    assert raced  # the stop met a connection accepted but not yet set up
    assert still_open == 0
    assert closed
