"""What a gRPC client can make this node hold: the limits of the transport's gRPC server.

:class:`ServerLimits` are enforced by :class:`~trio_raft.transport.grpc_h2server.LimitedServer`,
the grpclib server that :class:`~trio_raft.transport.GRPCTransport` runs (the raft service and
any application services share it, so the limits cover them all).

Invariants (the numbers are :class:`ServerLimits`):

* A message body is read only after its declared length (the 5-byte gRPC message prefix) has
  passed the cap of its route (``max_message_bytes`` for the raft service, the transport's own;
  ``max_app_message_bytes`` for every other route) and has been reserved from the server-wide
  :class:`ReceiveBudget` (``receive_budget_bytes``). A refused message ends its call with
  RESOURCE_EXHAUSTED before a byte of its body is read; the reservation is returned when the
  body has been read (it then belongs to the handler) or the call ends.
* Flow-control credit: a connection starts with ``connection_window`` bytes of credit and each
  stream with ``stream_window`` (HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE); more credit is only
  granted as bytes are read, and bytes are only read into a reserved body. So a stream that
  declared a huge length, or whose handler is not reading, can make the node hold at most the
  windows, not the declared length.
* At most ``max_concurrent_streams`` streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS,
  announced in the server's first SETTINGS frame; a client that opens more loses the
  connection) and at most ``max_connections`` connections per server: one more is answered with
  a GOAWAY (ENHANCE_YOUR_CALM) and closed before any request is read.
* A message with the compressed flag is refused with UNIMPLEMENTED (the server announces no
  compression), a body cut short by the end of the stream with INVALID_ARGUMENT.

Memory bound: received bytes in flight are at most ``receive_budget_bytes`` (bodies being read)
plus ``max_connections * connection_window`` (credit granted but not yet read), plus the state
of the open streams and what the handlers keep of decoded messages (the raft service's queues
are bounded, see :mod:`.grpc_server`). docs/transport.md (section 3.7) gives the defaults and
the figures.

:func:`discard_request` reads and drops what a client still sends on a refused call (bounded),
so that the status can be sent after the client has finished sending: see
:mod:`.grpc_server` for why.
"""

from __future__ import annotations

from typing import Any

import attrs
from grpclib.exceptions import GRPCError
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

_MiB = 1 << 20
#: HTTP/2's bounds of a flow-control window (RFC 9113 section 6.9.1).
_MIN_WINDOW = 65_535
_MAX_WINDOW = (1 << 31) - 1
#: How much of a refused call's body is read per step while discarding it.
_DISCARD_STEP = 64 * 1024
#: The gRPC message prefix: compressed flag (1 byte) and length (4 bytes, big-endian).
MESSAGE_PREFIX = 5


def _positive(_: Any, attribute: Any, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _window(_: Any, attribute: Any, value: int) -> None:
    if not _MIN_WINDOW <= value <= _MAX_WINDOW:
        raise ValueError(f"{attribute.name} must be within {_MIN_WINDOW}-{_MAX_WINDOW}, "
                         f"got {value!r}")


@attrs.frozen(slots=True)
class ServerLimits:
    """Limits of the transport's gRPC server (see the module docstring for what each bounds).

    ``refusal_drain_bytes`` / ``refusal_drain_seconds``: how much a client that sent a malformed
    request may still send, and for how long, before the server stops waiting for the end of
    its request and resets the stream (see :mod:`.grpc_server`).
    """

    max_connections: int = attrs.field(default=64, validator=_positive)
    max_concurrent_streams: int = attrs.field(default=128, validator=_positive)
    connection_window: int = attrs.field(default=2 * _MiB, validator=_window)
    stream_window: int = attrs.field(default=1 * _MiB, validator=_window)
    receive_budget_bytes: int = attrs.field(default=96 * _MiB, validator=_positive)
    max_app_message_bytes: int = attrs.field(default=4 * _MiB, validator=_positive)
    refusal_drain_bytes: int = attrs.field(default=4 * _MiB, validator=_positive)
    refusal_drain_seconds: float = attrs.field(default=5.0, validator=_positive)


#: The HTTP/2 default window every stream and connection starts with before SETTINGS apply.
DEFAULT_WINDOW = 65_535


def server_connection(config: H2Configuration, limits: ServerLimits) -> H2Connection:
    """A server-side HTTP/2 connection announcing ``limits`` (streams, windows, header list)
    in its first SETTINGS, its connection window opened to ``connection_window``; the
    preface is queued in its ``data_to_send``."""
    h2 = H2Connection(config=config)
    h2.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
        SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
    })
    h2.initiate_connection()
    if limits.connection_window > DEFAULT_WINDOW:
        h2.increment_flow_control_window(limits.connection_window - DEFAULT_WINDOW)
    return h2


#: Messages this small are read from the small-message share of the receive budget first.
SMALL_MESSAGE_BYTES = 64 * 1024


class ReceiveBudget:
    """Bytes of message bodies being read, server-wide (touched on the loop thread only).

    One eighth of the capacity is kept for messages of at most :data:`SMALL_MESSAGE_BYTES`
    (the usual KV request, raft heartbeat or vote), so that clients holding the rest with
    large messages cannot stop small ones; a small message takes from the rest when its share
    is used up. :meth:`take` returns the share it took from (``None``: refused), which
    :meth:`give` wants back."""

    SMALL, LARGE = 0, 1

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.small_capacity = capacity // 8
        self.large_capacity = capacity - self.small_capacity
        self._used = [0, 0]
        self.peak = 0
        self.refused = 0

    @property
    def used(self) -> int:
        return self._used[0] + self._used[1]

    def take(self, n: int) -> int | None:
        if n <= SMALL_MESSAGE_BYTES and self._used[self.SMALL] + n <= self.small_capacity:
            share = self.SMALL
        elif self._used[self.LARGE] + n <= self.large_capacity:
            share = self.LARGE
        else:
            self.refused += 1
            return None
        self._used[share] += n
        self.peak = max(self.peak, self.used)
        return share

    def give(self, share: int, n: int) -> None:
        self._used[share] -= n


async def discard_request(stream: Any, max_bytes: int) -> bool:
    """Read and drop what the client still sends on a call (``stream``: grpclib's server
    stream), message by message, at most ``max_bytes``; True once the client has ended its
    side. Nothing is kept: a body is read in small steps."""
    inner = getattr(stream, "_stream", None)
    if inner is None:
        return False
    if getattr(inner, "ended_inside_message", False):
        return True
    read = getattr(inner, "recv_raw", inner.recv_data)
    seen = 0
    try:
        left = getattr(inner, "unread_body", 0)  # of a message refused on its prefix
        while left and seen <= max_bytes:
            step = min(left, _DISCARD_STEP)
            seen += step
            if len(await read(step)) < step:
                return True
            left -= step
        while seen <= max_bytes:
            meta = await read(MESSAGE_PREFIX)
            if not meta:
                return True
            left = int.from_bytes(meta[1:], "big")
            seen += MESSAGE_PREFIX + left
            while left and seen <= max_bytes:
                step = min(left, _DISCARD_STEP)
                if len(await read(step)) < step:
                    return True
                left -= step
    except (AssertionError, GRPCError):  # the client ended inside a message
        return True
    return False
