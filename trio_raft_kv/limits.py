"""What one kvnode lets its clients make it hold: the ``serve`` flags behind
:class:`~trio_raft.transport.grpc_limits.ServerLimits`, and the KV requests' size cap.

The raft transport and the KV/Admin services share one gRPC server (docs/transport.md, section
3.7), so these limits cover both. A KV request's message is capped at :data:`KV_MAX_REQUEST_BYTES`
(the largest valid request, a CompareAndSwap, plus framing), refused with RESOURCE_EXHAUSTED
before its body is read; the raft service keeps the transport's own cap. docs/operations.md
("Limits") says how to size the rest.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trio_raft.transport.grpc_limits import ServerLimits
from trio_raft_kv.statemachine import MAX_KEY_BYTES, MAX_VALUE_BYTES

#: A CompareAndSwap with the largest key, value and expected value, and room for the protobuf
#: tags and lengths of every field.
KV_MAX_REQUEST_BYTES = MAX_KEY_BYTES + 2 * MAX_VALUE_BYTES + 1024
_KiB = 1024
_MiB = 1024 * 1024
_DEFAULTS = ServerLimits()


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}-{high}, got {text!r}")
        return value

    return parse


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Add the connection and memory limit flags to ``serve``'s parser."""
    g = parser.add_argument_group(
        "limits", "what clients can make this node hold (docs/operations.md, Limits); they "
        "apply to every client of the port, the raft peers included")
    g.add_argument("--max-connections", type=_bounded_int(1, 1 << 20),
                   default=_DEFAULTS.max_connections,
                   help="connections the node accepts at once; one more is refused")
    g.add_argument("--max-streams-per-connection", type=_bounded_int(1, 1 << 20),
                   default=_DEFAULTS.max_concurrent_streams,
                   help="calls in flight per connection (HTTP/2 MAX_CONCURRENT_STREAMS)")
    g.add_argument("--receive-buffer-mib", type=_bounded_int(80, 1 << 20),
                   default=_DEFAULTS.receive_budget_bytes // _MiB,
                   help="MiB of request bodies the node reads at once, all clients together; "
                        "a request that does not fit is refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--connection-window-kib", type=_bounded_int(64, 1 << 21),
                   default=_DEFAULTS.connection_window // _KiB,
                   help="KiB a client may send on one connection before the node has read it "
                        "(HTTP/2 flow control)")
    g.add_argument("--stream-window-kib", type=_bounded_int(64, 1 << 21),
                   default=_DEFAULTS.stream_window // _KiB,
                   help="KiB a client may send on one call before the node has read it")


def server_limits(args: argparse.Namespace) -> ServerLimits:
    """The :class:`ServerLimits` the ``serve`` flags ask for."""
    return ServerLimits(
        max_connections=args.max_connections,
        max_concurrent_streams=args.max_streams_per_connection,
        receive_budget_bytes=args.receive_buffer_mib * _MiB,
        connection_window=min(args.connection_window_kib * _KiB, (1 << 31) - 1),
        stream_window=min(args.stream_window_kib * _KiB, (1 << 31) - 1),
        max_app_message_bytes=KV_MAX_REQUEST_BYTES)
