"""The exceptions of the KV service and its client, in trio_raft's hierarchy.

Every class here is a :class:`trio_raft.errors.RaftError` (through :class:`KVServiceError`), so
``except trio_raft.RaftError`` still catches everything this project raises on purpose. They live
in this package, not in ``trio_raft.errors``: the library knows nothing of the application.

Families:

* :class:`KVError`: a call to a kvnode failed. It carries the gRPC status and two facts the
  caller needs to decide what happened to the operation: ``sent`` (whether the request may have
  reached the server) and ``refused`` (the connection was refused during the TLS handshake or
  before the server spoke HTTP/2). ``not_applied`` combines them: True only when the operation
  certainly did not happen.
* :class:`Reply`: raised inside the service to answer a call with a non-OK status.
* :class:`StartRefusedError`, :class:`TLSFilesError`: a command cannot run as given; the
  operator must fix something (the CLI exits with its usage code, docs/operations.md).
* :class:`InvalidFieldError`: a malformed request field or command-line value.
* :class:`CommandError`: a malformed replicated command or snapshot payload.
* :class:`SealedStoreError`: a value sealed in the SQLite store cannot be opened.
"""

from __future__ import annotations

from grpclib.const import Status

from trio_raft.errors import RaftError

#: Statuses with which the service promises that the operation did not happen (protos/kv.proto).
NOT_APPLIED_STATUSES = frozenset({Status.FAILED_PRECONDITION, Status.INVALID_ARGUMENT})


class KVServiceError(RaftError):
    """Base of the errors of the KV service, its client and its command line."""


class KVError(KVServiceError):
    """A call to a kvnode failed.

    ``status`` is the gRPC status (``UNAVAILABLE`` for a connection that failed or dropped,
    ``DEADLINE_EXCEEDED`` for a deadline). ``leader_address`` is the ``leader-address`` trailer
    of a follower's refusal (empty when absent). ``address`` is the node that was called.
    ``sent`` is False when the failure happened before any byte of the request left this
    process (no connection, TLS refused): the operation certainly did not happen. ``refused``
    is True when the server or its certificate was refused during the TLS handshake, or the
    server closed the connection before speaking HTTP/2.
    """

    def __init__(self, status: Status, message: str, leader_address: str = "",
                 address: str = "", *, sent: bool = True, refused: bool = False) -> None:
        super().__init__(f"{status.name}: {message}" + (f" (at {address})" if address else ""))
        self.status = status
        self.message = message
        self.leader_address = leader_address
        self.address = address
        self.sent = sent
        self.refused = refused

    @property
    def not_applied(self) -> bool:
        """Whether the operation certainly did not happen (safe to retry anywhere)."""
        return not self.sent or self.status in NOT_APPLIED_STATUSES


class Reply(KVServiceError):
    """A non-OK gRPC status to answer a call with (``leader-address`` trailer when known)."""

    def __init__(self, status: Status, message: str, leader_address: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.leader_address = leader_address


class StartRefusedError(KVServiceError):
    """``serve`` refuses to start until the operator acts (e.g. a wiped member's data dir)."""


class TLSFilesError(KVServiceError):
    """``--tls-dir`` is missing a file, or a file is not a usable certificate or key."""


class InvalidFieldError(KVServiceError, ValueError):
    """A request field (or a command-line value) is malformed: an empty or oversized key, an
    unknown read mode, a bad member id or ``HOST:PORT``. The service answers INVALID_ARGUMENT."""


class CommandError(KVServiceError, ValueError):
    """A malformed replicated command or snapshot payload (never produced by this package's
    encoders)."""


class SealedStoreError(KVServiceError):
    """A value sealed in the SQLite store (``trio_raft_kv/sealedvalues.py``) cannot be opened:
    the store is sealed and the node has no key store or lacks the key, or a sealed value was
    damaged or moved to another key. Never answered with ciphertext; at start the node refuses
    to serve (exit code 2)."""
