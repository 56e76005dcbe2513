"""What a kvnode answers, on the grpclib side: statuses, strict request decoding, raw replies.

Owns three things the services share:

* :func:`status_for`: the one mapping from an exception to the status a client can rely on
  (protos/kv.proto). The engine's two error families map one to one (``docs/api.md``):
  ``NotAppliedError`` -> ``FAILED_PRECONDITION`` (with ``INVALID_ARGUMENT`` for malformed
  requests: both promise the operation did not happen), ``OutcomeUnknownError`` ->
  ``UNAVAILABLE`` (its outcome is unknown). A refusal that is not a
  :class:`~trio_raft_kv.errors.Reply` or an engine error this module knows is logged and
  answered ``UNAVAILABLE`` with a short message: a client never sees a stack trace.
* :class:`StrictRequest`: the request "type" the handlers register with grpclib. grpclib's
  protobuf codec decodes a request with ``FromString``; this one first walks the wire bytes
  (a truncated varint or length, a group or an invalid wire type is refused, where betterproto2
  would accept a prefix) and then checks that every decoded field has its schema's Python type
  (betterproto2 keeps a value of the wrong wire type as it came). Any failure is an
  :class:`~trio_raft_kv.errors.InvalidFieldError` (the transport's codec, which decodes for
  grpclib, wraps it in a ``GRPCError``), answered ``INVALID_ARGUMENT``.
* Sending replies on raw grpclib streams (:func:`send_reply`, :func:`send_messages`,
  :func:`end_stream_call`). These reach into grpclib 0.4's server stream (``_stream``,
  ``_codec``, ``_send_initial_metadata_done``); pyproject.toml caps grpclib below 0.5 for this.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import encode_grpc_message

from trio_raft import errors
from trio_raft_kv.errors import InvalidFieldError, Reply
from trio_raft_kv.flatproto import FlatSchema, encode_message

log = logging.getLogger("kvnode.service")

LEADER_ADDRESS_KEY = "leader-address"
#: Seconds a failed streaming call waits for the client to end its side after the status.
STREAM_LINGER = 10.0
_MESSAGE_PREFIX = struct.Struct(">?I")  # gRPC framing: compressed flag, length

M = TypeVar("M")


# -- exceptions -> statuses -------------------------------------------------------------------

def status_for(exc: BaseException, leader_address: Callable[[], str]) -> Reply:
    """The reply for ``exc``; ``leader_address()`` names the leader for a follower's refusal."""
    if isinstance(exc, Reply):
        return exc
    if isinstance(exc, InvalidFieldError):
        return Reply(Status.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, errors.OutcomeUnknownError):
        return Reply(Status.UNAVAILABLE, f"outcome unknown: {type(exc).__name__}")
    if isinstance(exc, errors.NotLeaderError | errors.LeadershipTransferInProgressError
                  | errors.EnvelopeCutoverInProgressError | errors.EngineClosedError):
        return Reply(Status.FAILED_PRECONDITION, f"not applied: {type(exc).__name__}",
                     leader_address())
    if isinstance(exc, errors.ConfigError):
        return Reply(Status.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, errors.NotAppliedError):
        return Reply(Status.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
    if type(exc).__name__.startswith("LeadershipTransfer"):
        return Reply(Status.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, errors.TransportClosedError):
        return Reply(Status.UNAVAILABLE, "node is stopping")
    log.error("unexpected error while serving a request", exc_info=exc)
    return Reply(Status.UNAVAILABLE, f"outcome unknown: internal error ({type(exc).__name__})")


# -- strict decoding ----------------------------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    raise InvalidFieldError("malformed request: truncated or overlong varint")


def check_wire_format(data: bytes) -> None:
    """Refuse bytes that are not a well-formed protobuf message (proto3: no groups)."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidFieldError("malformed request: field number 0")
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type == 2:
            size, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
        else:
            raise InvalidFieldError(f"malformed request: wire type {wire_type}")
        if pos + size > len(data):
            raise InvalidFieldError(f"malformed request: field {number} is truncated")
        pos += size


_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "bytes": bytes, "bool": bool, "enum": int,
    "uint64": int, "uint32": int, "int64": int, "int32": int,
}
_RANGES: dict[str, tuple[int, int]] = {"uint64": (0, 1 << 64), "uint32": (0, 1 << 32),
           "int64": (-(1 << 63), 1 << 63), "int32": (-(1 << 31), 1 << 31)}


def _type_matches(value: Any, proto_type: str) -> bool:
    expected = _PYTHON_TYPES[proto_type]
    if isinstance(value, bool) and proto_type != "bool":
        return False  # a bool is an int to Python, never to the schema
    return isinstance(value, expected)


def check_field_types(message: Any) -> None:
    """Every scalar field holds its schema's Python type (and range)."""
    for field in dataclasses.fields(message):
        meta = field.metadata.get("betterproto")
        proto_type = getattr(meta, "proto_type", None)
        if proto_type not in _PYTHON_TYPES or getattr(meta, "repeated", False):
            continue
        value: Any = getattr(message, field.name)
        if not _type_matches(value, proto_type):
            raise InvalidFieldError(f"{field.name}: expected a {proto_type}, got "
                                    f"{type(value).__name__}")
        low, high = _RANGES.get(proto_type, (None, None))
        if low is not None and high is not None and not low <= value < high:
            raise InvalidFieldError(f"{field.name}: {value} is out of range for {proto_type}")


class StrictRequest(Generic[M]):
    """Decodes requests of ``message_type`` for grpclib, refusing malformed ones (above)."""

    def __init__(self, message_type: type[M]) -> None:
        self.message_type = message_type

    def FromString(self, data: bytes) -> M:
        schema = FlatSchema.of(self.message_type)
        if schema is not None:  # the common case in one pass; anything else comes back below
            message: M = schema.decode(data, self._strict)
            return message
        return self._strict(data)

    def _strict(self, data: bytes) -> M:
        check_wire_format(data)
        try:
            message: M = self.message_type.parse(data)  # type: ignore[attr-defined]
        except Exception as exc:  # betterproto2 raises many kinds on bad input
            raise InvalidFieldError(f"malformed request: {type(exc).__name__}: {exc}") from None
        check_field_types(message)
        return message


def decode_failure(exc: BaseException) -> Reply | None:
    """The reply for a request that could not be decoded, or None when ``exc`` is not that.
    The transport's codec reports its own refusals (size cap, undecodable bytes) as a
    ``GRPCError`` with the status to send; :class:`StrictRequest` raises
    :class:`InvalidFieldError`, possibly wrapped in such a ``GRPCError``."""
    if isinstance(exc, GRPCError) and exc.status in (Status.INVALID_ARGUMENT,
                                                     Status.RESOURCE_EXHAUSTED):
        return Reply(exc.status, exc.message or "malformed request")
    if isinstance(exc, InvalidFieldError):
        return Reply(Status.INVALID_ARGUMENT, str(exc))
    return None


async def receive_request(stream: Any) -> Any:
    """The call's request; a malformed one raises :class:`Reply` (INVALID_ARGUMENT)."""
    try:
        return await stream.recv_message()
    except (InvalidFieldError, GRPCError) as exc:
        reply = decode_failure(exc)
        if reply is None:
            raise
        raise reply from None


# -- raw replies --------------------------------------------------------------------------------

async def send_reply(stream: Any, r: Reply) -> None:
    # grpclib refuses empty metadata values: an unknown leader is no trailer.
    metadata = {LEADER_ADDRESS_KEY: r.leader_address} if r.leader_address else None
    await stream.send_trailing_metadata(status=r.status, status_message=r.message,
                                        metadata=metadata)


async def send_stopping(stream: Any, exc: BaseException) -> None:
    log.debug("request failed outside the engine: %r", exc)
    await stream.send_trailing_metadata(status=Status.UNAVAILABLE,
                                        status_message="node is stopping")


async def send_messages(stream: Any, messages: list[Any]) -> None:
    """Send ``messages`` on a server stream in one DATA write (a gRPC DATA frame may carry
    several length-prefixed messages), instead of a write per message."""
    inner, codec = getattr(stream, "_stream", None), getattr(stream, "_codec", None)
    if inner is None or codec is None or len(messages) == 1:
        for m in messages:
            await stream.send_message(m)
        return
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    parts: list[bytes] = []
    cap = getattr(codec, "max_bytes", None)
    for m in messages:
        body = encode_message(m)  # the fast path for flat messages, betterproto2 otherwise
        if cap is not None and len(body) > cap:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"message of {len(body)} bytes exceeds limit {cap}")
        parts += (_MESSAGE_PREFIX.pack(False, len(body)), body)
    await inner.send_data(b"".join(parts))


async def end_stream_call(stream: Any, r: Reply) -> None:
    """End a call whose client may still be sending with ``r``'s status, so that the client
    reads every answer and the status.

    grpclib's ``send_trailing_metadata`` resets such a stream right after a non-OK status, and
    its client, seeing the reset, drops what it had not read yet, status included. So the
    trailers are sent here without the reset, and the client is given ``STREAM_LINGER``
    seconds to end its side (kvnode's client does so on reading the status) before the reset.
    """
    inner = getattr(stream, "_stream", None)
    if inner is None:  # not the grpclib this was written against: the plain way
        await send_reply(stream, r)
        return
    if not getattr(stream, "_send_initial_metadata_done", False):
        await stream.send_initial_metadata()
    headers = [("grpc-status", str(r.status.value)),
               ("grpc-message", encode_grpc_message(r.message))]
    if r.leader_address:
        headers.append((LEADER_ADDRESS_KEY, r.leader_address))
    await inner.send_headers(headers, end_stream=True)
    stream._send_trailing_metadata_done = True
    with contextlib.suppress(Exception):
        async with asyncio.timeout(STREAM_LINGER):
            async for _ in stream:  # whatever the client still sends: never proposed
                pass
            return
    with contextlib.suppress(Exception):
        await stream.cancel()
