"""An asyncio client for the kvnode services, with one-hop leader following.

A call that a follower answers with ``FAILED_PRECONDITION`` and a non-empty ``leader-address``
trailer is retried once at that address (the operation certainly did not happen, so this is
safe for writes too). Everything else is raised as :class:`~trio_raft_kv.errors.KVError`,
carrying the gRPC status and whether the request may have reached the server.

Nothing is sent on a new connection before the server has spoken HTTP/2 (its SETTINGS frame,
sent once the TLS handshake accepted this client). So a refusal during the handshake (TLS
1.3 reports a rejected client certificate only after the client's side of the handshake is
done) or a server that closes the connection at once is known to have happened before any
request left: ``KVError.sent`` is False and ``KVError.refused`` True. Waiting costs nothing
on a connection already open, and at most one round trip on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.client import Handler as _ClientHandler
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import KVError, TLSFilesError
from trio_raft_kv.flatproto import FlatCodec
from trio_raft_kv.validation import split_address

LEADER_ADDRESS_KEY = "leader-address"
KV = "/trio_raft.kv.v1.KV/"
ADMIN = "/trio_raft.kv.v1.Admin/"
TLS_FILES = ("ca.crt", "node.crt", "node.key")

R = TypeVar("R")

__all__ = ["ADMIN", "KV", "KVClient", "KVError", "PutPipeline", "client_ssl", "split_address"]


def tls_paths(tls_dir: str) -> dict[str, str]:
    """``DIR/ca.crt``, ``DIR/node.crt``, ``DIR/node.key``; a missing one is a
    :class:`TLSFilesError`."""
    paths = {name: os.path.join(tls_dir, name) for name in TLS_FILES}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise TLSFilesError(f"--tls-dir {tls_dir!r}: missing {', '.join(missing)}")
    return paths


def client_ssl(tls_dir: str | None) -> ssl.SSLContext | None:
    """Mutual TLS from ``DIR/ca.crt`` (trust) and ``DIR/node.crt`` + ``DIR/node.key``."""
    if not tls_dir:
        return None
    from trio_raft.transport.tls import client_ssl_context

    p = tls_paths(tls_dir)
    try:
        return client_ssl_context(p["ca.crt"], certfile=p["node.crt"], keyfile=p["node.key"])
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFilesError(f"--tls-dir {tls_dir!r}: not a usable CA, certificate and key: "
                            f"{exc}") from None


class _GreetedProtocol(H2Protocol):
    """grpclib's HTTP/2 protocol, noting whether the server spoke before the connection ended."""

    greeted: asyncio.Future[bool]

    def connection_made(self, transport: Any) -> None:
        self.greeted = asyncio.get_running_loop().create_future()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.greeted.done():
            self.greeted.set_result(True)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.greeted.done():
            self.greeted.set_result(False)
        super().connection_lost(exc)


class _GreetedChannel(Channel):
    def _protocol_factory(self) -> H2Protocol:
        return _GreetedProtocol(_ClientHandler(), self._config, self._h2_config)


def _is_tls_refusal(exc: BaseException) -> bool:
    """A handshake failure (certificate, protocol), not a connection that merely ended."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError)


class KVClient:
    """``async with KVClient("127.0.0.1:7001") as c: await c.put("k", b"v")``."""

    def __init__(self, address: str, *, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._ssl = ssl_context
        self._channels: dict[str, Channel] = {}

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def _channel(self, address: str) -> Channel:
        ch = self._channels.get(address)
        if ch is None:
            try:
                host, port = split_address(address)
            except ValueError as exc:
                raise KVError(Status.INVALID_ARGUMENT, str(exc), "", address,
                              sent=False) from None
            ch = _GreetedChannel(host, port, ssl=self._ssl, codec=FlatCodec())
            self._channels[address] = ch
        return ch

    async def connect(self, address: str) -> Channel:
        """The channel to ``address``, connected and greeted by the server (see the module
        docstring); a failure is a :class:`KVError` with ``sent`` False."""
        ch = self._channel(address)
        try:
            async with asyncio.timeout(self.timeout):
                protocol = await ch.__connect__()
                greeted = getattr(protocol, "greeted", None)
                spoke = True if greeted is None else await asyncio.shield(greeted)
        except Exception as exc:
            self._drop_channel(address, ch)
            if _is_tls_refusal(exc):
                raise KVError(Status.UNAVAILABLE, f"TLS handshake failed: {exc}", "", address,
                              sent=False, refused=True) from None
            if isinstance(exc, TimeoutError):
                raise KVError(Status.DEADLINE_EXCEEDED,
                              f"no connection within {self.timeout:g}s", "", address,
                              sent=False) from None
            raise KVError(Status.UNAVAILABLE, f"cannot connect: {type(exc).__name__}: {exc}",
                          "", address, sent=False) from None
        if not spoke:
            self._drop_channel(address, ch)
            raise KVError(Status.UNAVAILABLE, "the server closed the connection before "
                          "speaking HTTP/2 (TLS refused, or not a kvnode)", "", address,
                          sent=False, refused=True)
        return ch

    async def call_at(self, address: str, path: str, request: Any, reply_type: type[R]) -> R:
        """One call at ``address`` (no leader following)."""
        ch = await self.connect(address)
        stream_cm = ch.request(path, Cardinality.UNARY_UNARY, type(request), reply_type,
                               timeout=self.timeout)
        try:
            async with stream_cm as stream:
                await stream.send_message(request, end=True)
                try:
                    reply = await stream.recv_message()
                except GRPCError as exc:
                    tm: Any = stream.trailing_metadata or {}
                    raise KVError(exc.status, exc.message or "",
                                  str(tm.get(LEADER_ADDRESS_KEY, "")), address) from None
                assert reply is not None
                return reply
        except KVError:
            raise
        except GRPCError as exc:
            raise KVError(exc.status, exc.message or "", "", address) from None
        except (TimeoutError, OSError, StreamTerminatedError, ssl.SSLError,
                AttributeError) as exc:
            # AttributeError: grpclib (0.4.x) can hand out a connection it is tearing down
            # after the peer dropped it ('Connection' object has no attribute '_transport').
            # A dead connection is dropped so the next call reconnects.
            self._drop_channel(address, ch)
            status = Status.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else (
                Status.UNAVAILABLE)
            raise KVError(status, f"{type(exc).__name__}: {exc}", "", address) from None

    def _drop_channel(self, address: str, ch: Channel) -> None:
        if self._channels.get(address) is ch:  # not one another call opened since
            del self._channels[address]
            with contextlib.suppress(Exception):
                ch.close()

    async def call(self, path: str, request: Any, reply_type: type[R], *,
                   follow: bool = True) -> R:
        try:
            return await self.call_at(self.address, path, request, reply_type)
        except KVError as exc:
            if (follow and exc.status is Status.FAILED_PRECONDITION and exc.leader_address
                    and exc.leader_address != self.address):
                return await self.call_at(exc.leader_address, path, request, reply_type)
            raise

    async def backup(self, sink: Callable[[bytes], object]) -> pb.BackupChunk:
        """A backup from the leader (one redirect followed): each chunk of the file goes to
        ``sink`` in order; returns the first message (index, term, size). Fails with
        :class:`KVError` (``sent`` False when nothing was asked)."""
        try:
            return await self._backup_at(self.address, sink)
        except KVError as exc:
            if (exc.status is Status.FAILED_PRECONDITION and exc.leader_address
                    and exc.leader_address != self.address):
                return await self._backup_at(exc.leader_address, sink)
            raise

    async def _backup_at(self, address: str, sink: Callable[[bytes], object]
                         ) -> pb.BackupChunk:
        ch = await self.connect(address)
        stream_cm = ch.request(ADMIN + "Backup", Cardinality.UNARY_STREAM, pb.BackupRequest,
                               pb.BackupChunk, timeout=self.timeout)
        try:
            async with stream_cm as stream:
                await stream.send_message(pb.BackupRequest(), end=True)
                try:
                    head = await stream.recv_message()
                    if head is None:
                        raise KVError(Status.UNAVAILABLE, "the server sent no backup", "",
                                      address)
                    received = 0
                    async for chunk in stream:
                        sink(chunk.data)
                        received += len(chunk.data)
                except GRPCError as exc:
                    tm: Any = stream.trailing_metadata or {}
                    raise KVError(exc.status, exc.message or "",
                                  str(tm.get(LEADER_ADDRESS_KEY, "")), address) from None
                if received != head.size:
                    raise KVError(Status.UNAVAILABLE, f"backup cut short: {received} of "
                                  f"{head.size} bytes", "", address)
                return head
        except KVError:
            raise
        except GRPCError as exc:
            raise KVError(exc.status, exc.message or "", "", address) from None
        except (TimeoutError, OSError, StreamTerminatedError, ssl.SSLError,
                AttributeError) as exc:
            self._drop_channel(address, ch)
            status = Status.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else (
                Status.UNAVAILABLE)
            raise KVError(status, f"{type(exc).__name__}: {exc}", "", address) from None

    def put_pipeline(self, address: str | None = None) -> PutPipeline:
        """``async with c.put_pipeline() as p: await p.put(k, v)`` (from many tasks): puts over
        one PutStream call at ``address`` (default: this client's), no leader following."""
        return PutPipeline(self, address or self.address)

    # -- KV ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes) -> pb.PutResponse:
        return await self.call(KV + "Put", pb.PutRequest(key=key, value=value), pb.PutResponse)

    async def get(self, key: str, mode: pb.ReadMode = pb.ReadMode.LINEARIZABLE,
                  *, follow: bool = True) -> pb.GetResponse:
        return await self.call(KV + "Get", pb.GetRequest(key=key, mode=mode), pb.GetResponse,
                               follow=follow)

    async def delete(self, key: str) -> pb.DeleteResponse:
        return await self.call(KV + "Delete", pb.DeleteRequest(key=key), pb.DeleteResponse)

    async def cas(self, key: str, value: bytes, *, expected: bytes = b"",
                  expect_absent: bool = False) -> pb.CasResponse:
        req = pb.CasRequest(key=key, expected=expected, expect_absent=expect_absent, value=value)
        return await self.call(KV + "CompareAndSwap", req, pb.CasResponse)

    async def status(self, address: str | None = None) -> pb.StatusResponse:
        return await self.call_at(address or self.address, KV + "Status", pb.StatusRequest(),
                                  pb.StatusResponse)

    # -- Admin ---------------------------------------------------------------------------
    async def add_learner(self, node_id: str, address: str) -> pb.AdminResponse:
        return await self.call(ADMIN + "AddLearner",
                               pb.AddLearnerRequest(id=node_id, address=address),
                               pb.AdminResponse)

    async def promote(self, node_id: str, min_applied_index: int = 0) -> pb.AdminResponse:
        return await self.call(ADMIN + "Promote",
                               pb.PromoteRequest(id=node_id, min_applied_index=min_applied_index),
                               pb.AdminResponse)

    async def remove(self, node_id: str) -> pb.AdminResponse:
        return await self.call(ADMIN + "Remove", pb.RemoveRequest(id=node_id), pb.AdminResponse)

    async def transfer(self, node_id: str = "") -> pb.AdminResponse:
        return await self.call(ADMIN + "Transfer", pb.TransferRequest(id=node_id),
                               pb.AdminResponse)

    async def members(self, address: str | None = None) -> pb.MembersResponse:
        """The membership as the node at ``address`` knows it (default: the leader's)."""
        if address is not None:
            return await self.call_at(address, ADMIN + "Members", pb.MembersRequest(),
                                      pb.MembersResponse)
        return await self.call(ADMIN + "Members", pb.MembersRequest(), pb.MembersResponse)

    async def announce(self, node_id: str) -> pb.AdminResponse:
        return await self.call(ADMIN + "Announce", pb.AnnounceRequest(id=node_id),
                               pb.AdminResponse)

    async def encryption_enable(self) -> pb.EncryptionResponse:
        return await self.call(ADMIN + "EncryptionEnable", pb.EncryptionRequest(),
                               pb.EncryptionResponse)

    async def encryption_rotate(self) -> pb.EncryptionResponse:
        return await self.call(ADMIN + "EncryptionRotate", pb.EncryptionRequest(),
                               pb.EncryptionResponse)

    async def compact(self, address: str, min_index: int = 0) -> pb.AdminResponse:
        """Compact the node at ``address`` itself (no leader following)."""
        return await self.call_at(address, ADMIN + "Compact",
                                  pb.CompactRequest(min_index=min_index), pb.AdminResponse)

    async def was_member(self, address: str, node_id: str) -> pb.WasMemberResponse:
        return await self.call_at(address, ADMIN + "WasMember", pb.WasMemberRequest(id=node_id),
                                  pb.WasMemberResponse)


class PutPipeline:
    """Puts in flight over one PutStream call; answers come back in order and are matched to
    the waiting callers. The first failure ends the call and is raised to every caller still
    waiting and every later one; its status says what became of their writes (kv.proto)."""

    def __init__(self, client: KVClient, address: str) -> None:
        self._client = client
        self._address = address
        self._cm: Any = None
        self._stream: Any = None
        self._waiting: deque[asyncio.Future[pb.PutResponse]] = deque()
        self._send_lock = asyncio.Lock()
        self._sending_ended = False
        self._receiver: asyncio.Task[None] | None = None
        self._error: KVError | None = None

    async def __aenter__(self) -> PutPipeline:
        channel = await self._client.connect(self._address)
        self._cm = channel.request(KV + "PutStream", Cardinality.STREAM_STREAM,
                                   pb.PutRequest, pb.PutResponse)
        try:
            self._stream = await self._cm.__aenter__()
            await self._stream.send_request()
        except (OSError, StreamTerminatedError, ssl.SSLError, AttributeError) as exc:
            # AttributeError: see KVClient.call_at
            raise self._unavailable(exc) from None
        self._receiver = asyncio.ensure_future(self._receive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await self._end_sending()
                if self._receiver is not None:
                    await asyncio.wait([self._receiver])  # the server's answers and status
        finally:
            if self._receiver is not None:
                self._receiver.cancel()
            self._fail(KVError(Status.UNAVAILABLE, "pipeline closed", "", self._address))
            with contextlib.suppress(Exception):
                await self._cm.__aexit__(None, None, None)

    async def put(self, key: str, value: bytes) -> pb.PutResponse:
        if self._error is not None:
            raise self._error
        fut: asyncio.Future[pb.PutResponse] = asyncio.get_running_loop().create_future()
        async with self._send_lock:
            self._waiting.append(fut)
            if not self._sending_ended:
                # A send fails when the call has ended; the receiver then fails ``fut`` with
                # the call's status, which says more than the send's error.
                try:
                    await self._stream.send_message(pb.PutRequest(key=key, value=value))
                except (GRPCError, OSError, StreamTerminatedError, ssl.SSLError):
                    pass
                except asyncio.CancelledError:
                    # Whether it left is unknown, so answers can no longer be matched.
                    self._fail(KVError(Status.UNAVAILABLE, "a put was cancelled while being "
                                       "sent: pipeline closed", "", self._address))
                    raise
        return await fut

    async def _end_sending(self) -> None:
        async with self._send_lock:
            if self._sending_ended:
                return
            self._sending_ended = True
            with contextlib.suppress(Exception):
                await self._stream.end()

    async def _receive(self) -> None:
        try:
            async for reply in self._stream:
                if self._error is not None:
                    continue  # answers can no longer be matched (see put)
                fut = self._waiting.popleft()
                if not fut.done():  # its caller may have given up
                    fut.set_result(reply)
            # grpclib hands out the status once our side is ended too; the server waits for
            # that after a failure (no request sent after its status is ever proposed).
            await self._end_sending()
            await self._stream.recv_trailing_metadata()  # raises GRPCError unless OK
            error = KVError(Status.UNAVAILABLE, "the server ended the stream", "",
                            self._address)
        except GRPCError as exc:
            tm = self._stream.trailing_metadata or {}
            error = KVError(exc.status, exc.message or "", str(tm.get(LEADER_ADDRESS_KEY, "")),
                            self._address)
        except Exception as exc:  # a dropped connection, or grpclib tearing one down
            error = self._unavailable(exc)
        self._fail(error)

    def _unavailable(self, exc: BaseException) -> KVError:
        return KVError(Status.UNAVAILABLE, f"{type(exc).__name__}: {exc}", "", self._address)

    def _fail(self, error: KVError) -> None:
        if self._error is None:
            self._error = error
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(self._error)
