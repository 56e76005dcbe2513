"""The transport protocols the engine talks to, and the small value types around them.

Theory of operation
-------------------
A transport moves :class:`~trio_raft.core.messages.Message` values between nodes. The engine
needs exactly :class:`Transport`:

* :meth:`Transport.attach` gives it, once, the inbound handler (an ``async`` function that takes
  a message and either returns: accepted, e.g. queued for the run loop; or raises, e.g.
  :class:`~trio_raft.errors.StepQueueFullError`: the error travels back to the sender) and the
  storage-side :class:`~trio_raft.storage.snapshot_exchange.SnapshotExchange` through which
  snapshot payloads leave and arrive (``None``: payloads travel inline in ``Snapshot.data``);
* :meth:`Transport.detach` undoes it: inbound messages are refused from then on, in-flight
  incoming snapshot transfers are cancelled, and it returns once they are gone (files closed,
  spools removed, nothing handed to the handler);
* :meth:`Transport.upsert_peer` / :meth:`Transport.remove_peer` keep the peer table;
* :meth:`Transport.send` (every message but ``MsgSnap``) and :meth:`Transport.send_snapshot`
  (``MsgSnap`` with its payload) are called from the engine's per-peer sender tasks. They return
  once the message is handed to the network (for gRPC: written to the peer's stream, or
  acknowledged) and raise on failure. ``send`` may return the ``time.perf_counter()`` instant
  the message was written (None when it does not know); the engine times its ``send`` stage
  with it (``trio_raft/engine/stages.py``). Every failure raised is a
  :class:`~trio_raft.errors.RaftError` whose counter key :func:`error_code` gives (gRPC status
  names in CamelCase). Cancellation (``trio.Cancelled``) is never counted and always propagates;
  cancelling a ``send_snapshot`` stops the transfer and closes the payload file before it
  returns.

:class:`ServingTransport` is the optional extra ability of a transport the engine may own and run
itself (the engine builds a :class:`~trio_raft.transport.grpc.GRPCTransport` when it is given
none): ``await nursery.start(t.serve)`` and ``await t.aclose()``. A transport the application
passes in is run by the application. Both concrete transports satisfy both protocols; mypy
checks it through the assignments at the bottom of :mod:`trio_raft.transport`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

import attrs
import trio

from trio_raft.core.messages import Message
from trio_raft.errors import DispatchError, RaftError, TransportError
from trio_raft.storage.snapshot_exchange import SnapshotExchange

#: The inbound handler: accept a message or raise.
Handler = Callable[[Message], Awaitable[None]]

#: Set by a transport, in the task that calls the inbound handler, right before the call: the
#: ``time.perf_counter()`` instant the message was read from the network (decoded); None when
#: the transport does not say. The engine times its ``receive`` stage with it.
RECEIVED_AT: ContextVar[float | None] = ContextVar("trio_raft_received_at", default=None)

#: gRPC status code names in CamelCase (as Go's ``codes.Code.String()`` spells them), by number.
GRPC_CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}


def error_code(exc: BaseException) -> str:
    """The counter key for a send failure: the ``code`` attribute when the error has one
    (:class:`~trio_raft.errors.DispatchError`), ``DeadlineExceeded`` for timeouts, else
    ``Unknown``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, TimeoutError | trio.TooSlowError):
        return "DeadlineExceeded"
    return "Unknown"


@attrs.frozen(slots=True)
class TransportPeer:
    """A peer as the transport knows it: raft node id, the operator's id, and ``host:port``."""

    node_id: int
    id: str
    address: str


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port; raises ``ValueError``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@attrs.define(slots=True)
class ErrorCounter:
    """Send errors by code, owned by the trio side of a transport."""

    total: int = 0
    by_code: dict[str, int] = attrs.field(factory=dict)

    def record(self, code: str) -> None:
        self.total += 1
        self.by_code[code] = self.by_code.get(code, 0) + 1


@runtime_checkable
class Transport(Protocol):
    """What the engine needs from a transport (see the module docstring)."""

    def attach(self, handler: Handler, snapshots: SnapshotExchange | None) -> None:
        """Install the inbound handler and the snapshot exchange; raises
        :class:`~trio_raft.errors.TransportAttachedError` when one is attached already."""

    async def detach(self) -> None:
        """Refuse inbound messages from now on, cancel in-flight incoming snapshot transfers,
        and return when they are gone. Idempotent."""

    def upsert_peer(self, peer: TransportPeer) -> None:
        """Add a peer or change its address."""

    def remove_peer(self, node_id: int) -> None:
        """Forget a peer and close what the transport holds for it."""

    async def send(self, message: Message) -> float | None:
        """Send a message that is not ``MsgSnap`` to ``message.to``; raises on failure. May
        return the ``time.perf_counter()`` instant it was written."""

    async def send_snapshot(self, message: Message) -> None:
        """Send a ``MsgSnap`` and its payload to ``message.to``; raises on failure."""


@runtime_checkable
class DirectSend(Protocol):
    """What a transport may add to :class:`Transport`: a send that completes without yielding
    when it can (the engine then skips a sender task's turn, docs/transport.md 3.9)."""

    def send_nowait(self, message: Message) -> float | None:
        """Write ``message`` (not ``MsgSnap``) now if that needs no waiting: the
        ``time.perf_counter()`` instant it was written, or ``None`` when it was not sent (the
        engine then gives it to :meth:`Transport.send`, which reports any failure). Never
        raises for a message it does not send."""


@runtime_checkable
class ServingTransport(Transport, Protocol):
    """A transport the engine may own: it runs it with ``nursery.start`` and closes it."""

    async def serve(self, *,
                    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Run until :meth:`aclose` or cancellation; ``task_status.started`` once serving, with
        the bound port when there is one."""

    async def aclose(self) -> None:
        """Stop everything the transport runs; idempotent."""


__all__ = [
    "GRPC_CODE_NAMES",
    "RECEIVED_AT",
    "DirectSend",
    "DispatchError",
    "ErrorCounter",
    "Handler",
    "RaftError",
    "ServingTransport",
    "Transport",
    "TransportError",
    "TransportPeer",
    "error_code",
    "split_address",
]
