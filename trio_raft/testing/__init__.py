"""Test helpers: the deterministic core simulator (no trio, no I/O).

``python -m trio_raft.testing.simulator --seed N --nodes 3 --steps 1000`` replays one seed; see
:mod:`trio_raft.testing.simulator` and :mod:`trio_raft.testing.invariants`.
:mod:`trio_raft.testing.linearizability` checks recorded KV client histories (tests/chaos).
"""
