"""Loopback helpers for tests, benchmarks and demos that start real servers."""

from __future__ import annotations

import socket


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are bound together (so the ports differ) and closed before returning; a port can
    in principle be taken again before the caller binds it, which is fine for local tests.
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
