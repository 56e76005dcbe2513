"""SSL contexts for the gRPC transport (TLS and mutual TLS).

gRPC runs over HTTP/2, negotiated with ALPN ``h2``; these helpers build contexts with that set.
Pass the server context as ``GRPCTransport(server_ssl=...)`` and the client context as
``GRPCTransport(client_ssl=...)``. With ``client_ca`` given, the server requires a client
certificate signed by it (mutual TLS): a peer without one is refused during the handshake.
"""

from __future__ import annotations

import os
import ssl

_PathLike = str | os.PathLike[str]


def server_ssl_context(certfile: _PathLike, keyfile: _PathLike | None = None, *,
                       client_ca: _PathLike | None = None) -> ssl.SSLContext:
    """A server context presenting ``certfile``; requires client certificates signed by
    ``client_ca`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=os.fspath(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_ssl_context(cafile: _PathLike | None = None, *, certfile: _PathLike | None = None,
                       keyfile: _PathLike | None = None) -> ssl.SSLContext:
    """A client context trusting ``cafile`` (system roots when ``None``) and presenting
    ``certfile`` for mutual TLS when given."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=os.fspath(cafile) if cafile is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def enable_h2(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Set ALPN ``h2`` on a context built elsewhere; returns it."""
    ctx.set_alpn_protocols(["h2"])
    return ctx
