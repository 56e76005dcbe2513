"""Majority arithmetic over a single (non-joint) voter set.

Two questions only: which log index has a majority of voters acknowledged (the commit index
candidate), and has an election (or a read-index confirmation) been won, lost, or is it pending.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = 1
    LOST = 2
    WON = 3


def majority(n: int) -> int:
    """Size of a majority of ``n`` voters."""
    return n // 2 + 1


def committed_index(voters: Collection[int], acked: Callable[[int], int | None]) -> int:
    """The largest index acknowledged by a majority of ``voters``.

    ``acked(id)`` returns the voter's acknowledged index, or None when unknown (counts as 0).
    An empty voter set commits nothing (0).
    """
    n = len(voters)
    if n == 0:
        return 0
    if n == 1:
        (only,) = voters
        return acked(only) or 0
    srt = sorted((acked(v) or 0) for v in voters)
    # The value at position n - majority(n) (ascending) is held by at least a majority.
    return srt[n - majority(n)]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """Tally ``votes`` (id -> granted) over ``voters``; votes of non-voters are ignored."""
    if not voters:
        # An empty configuration wins trivially (etcd semantics); callers never campaign with one.
        return VoteResult.WON
    granted = rejected = 0
    for v in voters:
        got = votes.get(v)
        if got is None:
            continue
        if got:
            granted += 1
        else:
            rejected += 1
    q = majority(len(voters))
    if granted >= q:
        return VoteResult.WON
    if len(voters) - rejected >= q:
        return VoteResult.PENDING
    return VoteResult.LOST
