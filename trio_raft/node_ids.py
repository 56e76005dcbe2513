"""Server ids and their 64-bit raft node ids, shared by the engine and the envelope.

``derive_node_id`` is the one mapping from a server id string (``"n1"``) to the 64-bit node id
raft uses: 64-bit FNV-1a of the UTF-8 id, 0 for the empty id, and 1 where the hash happens to
be 0 (0 means "no node" to raft). It lives here, below both ``trio_raft.engine`` and
``trio_raft.envelope``, because the envelope's nonce source needs the same id the engine uses
and the envelope must not import the engine (``docs/architecture.md``).
"""

from __future__ import annotations

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def derive_node_id(node: str) -> int:
    """64-bit FNV-1a of the UTF-8 id; 0 for "", and 1 where the hash happens to be 0."""
    if not node:
        return 0
    h = _FNV_OFFSET
    for b in node.encode("utf-8"):
        h ^= b
        h = (h * _FNV_PRIME) & _MASK64
    return h or 1


def node_id_of(value: object, what: str = "node_id") -> int:
    """The 64-bit node id ``value`` stands for: a server id string (derived as the engine
    derives it) or the node id itself (an int in 1..2**64-1).

    Anything else is refused here, with a message naming ``what``: a ``TypeError`` for a wrong
    type (bool included), a ``ValueError`` for an empty id or an int out of range.
    """
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what}: the server id is empty")
        return derive_node_id(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be the server id string (e.g. 'n1') or its 64-bit node "
                        f"id, not {type(value).__name__}")
    if not 0 < value <= _MASK64:
        raise ValueError(f"{what}: node id {value} is not in 1..2**64-1")
    return value
