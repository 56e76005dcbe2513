"""The versioned wire frame of a raft message.

A frame is one version byte followed by the message encoded by :mod:`trio_raft.core.encoding`::

    frame = VERSION (u8, currently 1) || message_to_bytes(message)

The frame travels as the ``message`` bytes field of ``RaftMessage`` (and as the ``metadata`` field
of the first ``SnapshotChunk``). There is exactly one encoding of a raft message in the project;
this module only adds the version byte, the size cap and the error contract.

Decoding accepts untrusted bytes. It raises :class:`~trio_raft.errors.CodecError` and nothing
else, and never allocates more than the capped, declared sizes (the message decoder checks every
declared length against the bytes that remain before using it).
"""

from __future__ import annotations

import struct

import attrs

from trio_raft.core.encoding import message_from_bytes, message_to_bytes
from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import Message
from trio_raft.errors import CodecError

#: The only frame version this build reads and writes.
WIRE_VERSION = 1
#: Upper bound of one frame (and of any gRPC message the transport sends or accepts).
MAX_FRAME_BYTES = 64 << 20

_VERSION_BYTE = bytes([WIRE_VERSION])


def encode_message(message: Message, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Encode ``message`` as a wire frame.

    Raises :class:`CodecError` when a field is out of range for the layout (a negative or
    over-wide integer) or when the frame would exceed ``max_bytes``.
    """
    try:
        body = message_to_bytes(message)
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode {message.type!r}: {exc}") from None
    if len(body) + 1 > max_bytes:
        raise CodecError(f"frame of {len(body) + 1} bytes exceeds limit {max_bytes}")
    return _VERSION_BYTE + body


def decode_message(frame: bytes | bytearray | memoryview, *,
                   max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Decode a wire frame; raises only :class:`CodecError`."""
    try:
        n = len(frame)
        if n == 0:
            raise CodecError("empty frame")
        if n > max_bytes:
            raise CodecError(f"frame of {n} bytes exceeds limit {max_bytes}")
        version = frame[0]
        if version != WIRE_VERSION:
            raise CodecError(f"unsupported frame version {version}")
        return message_from_bytes(memoryview(frame)[1:])
    except CodecError:
        raise
    except DecodeError as exc:
        raise CodecError(str(exc)) from None
    except Exception as exc:  # defensive: the contract is "CodecError and nothing else"
        raise CodecError(f"malformed frame: {type(exc).__name__}: {exc}") from None


def encode_snapshot_header(message: Message, *, max_bytes: int = MAX_FRAME_BYTES,
                           keep_token: bool = False) -> bytes:
    """Encode the metadata frame of a snapshot stream: ``message`` with ``snapshot.data`` empty
    (the payload travels in the stream's chunks), or, with ``keep_token``, still holding the
    17-byte token that names the payload file (it announces the payload's CRC32C)."""
    snap = message.snapshot
    if snap is not None and snap.data and not keep_token:
        message = attrs.evolve(message, snapshot=attrs.evolve(snap, data=b""))
    return encode_message(message, max_bytes=max_bytes)
