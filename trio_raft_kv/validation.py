"""Validation of every field a kvnode request carries, and of ``HOST:PORT`` addresses.

Each check raises :class:`~trio_raft_kv.errors.InvalidFieldError` with a message naming the
field; the services answer it with INVALID_ARGUMENT (certainly not applied), and the command
line reports it as a usage error. A request is validated whole before anything is proposed, so
a rejected request never leaves a trace in the log.

Rules (what kv.proto's fields may hold):

* ``key``: 1 to :data:`~trio_raft_kv.statemachine.MAX_KEY_BYTES` bytes of UTF-8 (invalid UTF-8
  is refused earlier, when the message is decoded);
* ``value``, ``expected``: at most :data:`~trio_raft_kv.statemachine.MAX_VALUE_BYTES` bytes;
  ``expected`` must be empty when ``expect_absent`` is set;
* ``mode``: one of the ``ReadMode`` values the schema defines. betterproto2 decodes a value the
  schema does not define into an invented enum member instead of failing, so the check compares
  the number against the defined members;
* member ids: 1 to :data:`MAX_ID_BYTES` bytes, printable, without whitespace, ``,`` or ``=``
  (the separators of ``--peers``);
* addresses: ``HOST:PORT`` with a non-empty host (``[v6]`` brackets allowed) and a port in
  1-65535 (0 too for an address to listen on).
"""

from __future__ import annotations

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import InvalidFieldError
from trio_raft_kv.statemachine import MAX_KEY_BYTES, MAX_VALUE_BYTES

MAX_ID_BYTES = 256
_READ_MODES = frozenset(m.value for m in pb.ReadMode.__members__.values())
_ID_FORBIDDEN = frozenset(",=")


def check_key(key: str) -> None:
    if not key:
        raise InvalidFieldError("key must not be empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidFieldError(f"key longer than {MAX_KEY_BYTES} bytes")


def check_value(value: bytes, what: str = "value") -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidFieldError(f"{what} larger than {MAX_VALUE_BYTES} bytes")


def check_cas(key: str, value: bytes, expected: bytes, expect_absent: bool) -> None:
    check_key(key)
    check_value(value)
    check_value(expected, "expected")
    if expect_absent and expected:
        raise InvalidFieldError("expect_absent and expected are exclusive")


def check_read_mode(mode: int) -> pb.ReadMode:
    """The schema's ``ReadMode`` member for ``mode``; refuses numbers it does not define."""
    if int(mode) not in _READ_MODES:
        raise InvalidFieldError(f"unknown read mode {int(mode)}")
    return pb.ReadMode(int(mode))


def check_member_id(member_id: str, what: str = "id") -> None:
    if not member_id:
        raise InvalidFieldError(f"{what} is required")
    if len(member_id.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidFieldError(f"{what} longer than {MAX_ID_BYTES} bytes")
    if not member_id.isprintable() or any(c.isspace() or c in _ID_FORBIDDEN
                                          for c in member_id):
        raise InvalidFieldError(
            f"{what} {member_id!r} may not hold whitespace, control characters, ',' or '='")


def split_address(address: str, what: str = "address", *,
                  any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``[::1]:7001`` -> ("::1", 7001). ``any_port``: port 0
    (the system picks one, for addresses to listen on) is accepted too."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise InvalidFieldError(f"{what}: expected HOST:PORT, got {address!r}")
    lowest = 0 if any_port else 1
    if not lowest <= int(port) <= 65535:
        raise InvalidFieldError(f"{what}: port {port} is not in {lowest}-65535 ({address!r})")
    if host.startswith("["):
        if not host.endswith("]") or len(host) == 2:
            raise InvalidFieldError(f"{what}: expected HOST:PORT, got {address!r}")
        host = host[1:-1]
    if any(c.isspace() for c in host):
        raise InvalidFieldError(f"{what}: expected HOST:PORT, got {address!r}")
    return host, int(port)


def check_address(address: str, what: str = "address") -> None:
    split_address(address, what)
