"""The status that ends a failed PutStream call speaks for every unanswered write (kv.proto)."""

from __future__ import annotations

import asyncio
from typing import Any

from grpclib.const import Status

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import Reply
from trio_raft_kv.putstream import settle_after_failure

NOT_LEADER = Reply(Status.FAILED_PRECONDITION, "not the leader", "127.0.0.1:7001")


def settle(first: Reply, later: list[Any]) -> Reply:
    """``later``: what each write proposed after ``first`` came to (a Reply or a result)."""

    async def main() -> Reply:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for outcome in later:
            fut = loop.create_future()
            # settled only after the drain started waiting: the drain must wait for each
            loop.call_later(0.001, _resolve, fut, outcome)
            queue.put_nowait((pb.PutRequest(key="k"), fut))
        queue.put_nowait(Reply(Status.INVALID_ARGUMENT, "a malformed request read later"))
        return await settle_after_failure(queue, first)

    return asyncio.run(main())


def _resolve(fut: asyncio.Future[Any], outcome: Any) -> None:
    if isinstance(outcome, Reply):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


def test_not_applied_when_nothing_proposed_later_was_applied() -> None:
    assert settle(NOT_LEADER, []) is NOT_LEADER
    assert settle(NOT_LEADER, [NOT_LEADER, NOT_LEADER]) is NOT_LEADER
    bad = Reply(Status.INVALID_ARGUMENT, "key must not be empty")
    assert settle(bad, [NOT_LEADER]) is bad


def test_unknown_when_a_later_write_was_applied_or_may_have_been() -> None:
    applied = settle(NOT_LEADER, [NOT_LEADER, object()])
    assert applied.status is Status.UNAVAILABLE
    assert "not the leader" in applied.message
    lost = settle(NOT_LEADER, [Reply(Status.UNAVAILABLE, "outcome unknown")])
    assert lost.status is Status.UNAVAILABLE


def test_an_unknown_first_failure_stays_unknown() -> None:
    first = Reply(Status.UNAVAILABLE, "outcome unknown: LeadershipLostError")
    r = settle(first, [NOT_LEADER])
    assert r.status is Status.UNAVAILABLE
