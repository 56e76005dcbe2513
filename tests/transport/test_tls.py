"""TLS and mutual TLS (certificates made by trustme)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme

from tests.transport.conftest import Inbox, app
from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import DispatchError
from trio_raft.transport import GRPCTransport, TransportPeer
from trio_raft.transport.tls import client_ssl_context, server_ssl_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("node-1.raft")
    rogue = other_ca.issue_cert("rogue.raft")
    paths = {"ca": d / "ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for name, cert in (("server", server), ("client", client), ("rogue", rogue)):
        paths[name] = d / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(paths[name]))
    return paths


async def _serve_and_send(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                          ) -> tuple[Inbox, list[DispatchError]]:
    inbox = Inbox()
    errors: list[DispatchError] = []
    b = GRPCTransport(server_ssl=server_ctx)
    b.attach(inbox, None)
    a = GRPCTransport(client_ssl=client_ctx, dispatch_timeout=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        port = await nursery.start(b.serve, "127.0.0.1", 0)
        a.upsert_peer(TransportPeer(2, "n2", f"127.0.0.1:{port}"))
        for m in (Message(MessageType.HEARTBEAT, to=2, from_=1), app(1)):
            try:
                await a.send(m)
            except DispatchError as exc:
                errors.append(exc)
        if not errors:
            await inbox.wait_for(2)
            # In TLS the lanes are native on the sending side, grpclib serves them
            # (docs/transport.md 3.8)
            assert a._client is not None and a._client.channels == {}
            sent = a.stats()
            assert sent["stream_opens"] == 1 and sent["priority_opens"] == 1
            assert sent["channels"] == 2
            assert "native_connections" not in b.stats()
        await a.aclose()
        await b.aclose()
    return inbox, errors


async def test_tls(pki: dict[str, Path]) -> None:
    inbox, errors = await _serve_and_send(server_ssl_context(pki["server"]),
                                          client_ssl_context(pki["ca"]))
    assert errors == []
    assert len(inbox.messages) == 2


async def test_mutual_tls_accepts_a_valid_client_cert(pki: dict[str, Path]) -> None:
    inbox, errors = await _serve_and_send(
        server_ssl_context(pki["server"], client_ca=pki["ca"]),
        client_ssl_context(pki["ca"], certfile=pki["client"]))
    assert errors == []
    assert len(inbox.messages) == 2


@pytest.mark.parametrize("client_cert", [None, "rogue"])
async def test_mutual_tls_refuses_peer_without_valid_cert(pki: dict[str, Path],
                                                          client_cert: str | None) -> None:
    inbox, errors = await _serve_and_send(
        server_ssl_context(pki["server"], client_ca=pki["ca"]),
        client_ssl_context(pki["ca"], certfile=pki[client_cert] if client_cert else None))
    assert len(errors) == 2
    assert all(e.code == "Unavailable" for e in errors)
    assert inbox.messages == []


async def test_client_refuses_untrusted_server(pki: dict[str, Path]) -> None:
    inbox, errors = await _serve_and_send(server_ssl_context(pki["server"]),
                                          client_ssl_context(pki["rogue"]))
    assert len(errors) == 2
    assert inbox.messages == []
