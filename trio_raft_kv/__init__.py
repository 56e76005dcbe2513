"""trio_raft_kv: a replicated key/value service on trio_raft, and its ``kvnode`` command.

Shipped in the same distribution as the library (``pip install '.[kv]'`` adds what only the
service needs). The library never imports this package; this package uses only the library's
public surface plus its gRPC transport.

Modules:

* :mod:`~trio_raft_kv.cli`: the command line and its one exit-code table;
  :mod:`~trio_raft_kv.commands` the client and admin commands; :mod:`~trio_raft_kv.serve` the
  ``serve`` command (one node); :mod:`~trio_raft_kv.demo` the ``demo`` command.
* :mod:`~trio_raft_kv.services`: the KV and Admin gRPC services; :mod:`~trio_raft_kv.putstream`
  the streaming put; :mod:`~trio_raft_kv.replies` statuses, strict decoding and raw replies;
  :mod:`~trio_raft_kv.flatproto` the fast path of decoding and encoding flat messages;
  :mod:`~trio_raft_kv.validation` the rules every request field obeys.
* :mod:`~trio_raft_kv.statemachine`: the replicated state machine, its command and snapshot
  encodings; :mod:`~trio_raft_kv.metrics` the Prometheus metrics of a node.
* :mod:`~trio_raft_kv.client`: an asyncio client with one-hop leader following;
  :mod:`~trio_raft_kv.errors` the exceptions (all under ``trio_raft.RaftError``).
* ``_proto``: the betterproto2/grpclib code generated from protos/kv.proto (``make protos``).

Invariants: a status ``FAILED_PRECONDITION`` or ``INVALID_ARGUMENT`` means the operation did
not happen, ``UNAVAILABLE`` that its outcome is unknown (protos/kv.proto); a request is
validated whole before anything is proposed. This module imports nothing, so the generated
code can be imported without the library (the PySyncObj benchmark does).
"""
