"""trio_raft/engine/waiters.py: a Waiter settles once and wakes its one caller, like an Event."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_raft.engine.waiters import Waiter


async def test_a_result_set_before_the_wait_is_returned_at_a_checkpoint() -> None:
    w = Waiter()
    w.resolve(7)
    w.resolve(8)  # later settlements are ignored
    w.fail(RuntimeError("late"))
    assert w.done
    assert await w.wait() == 7
    with trio.CancelScope() as scope:
        scope.cancel()
        await w.wait()  # a checkpoint even when settled: the cancellation is delivered
    assert scope.cancelled_caught


async def test_the_parked_caller_is_woken_with_the_result_or_the_error() -> None:
    got: list[object] = []

    async def waiter(w: Waiter) -> None:
        try:
            got.append(await w.wait())
        except LookupError as exc:
            got.append(exc)

    ok, bad = Waiter(), Waiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, ok)
        nursery.start_soon(waiter, bad)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and not ok.done
        ok.resolve("value")
        error = LookupError("gone")
        bad.fail(error)
        bad.resolve("ignored")
    assert len(got) == 2 and "value" in got and error in got  # woken in either order


async def test_a_cancelled_caller_leaves_nothing_to_wake() -> None:
    w = Waiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.wait)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    w.resolve(1)  # no task is parked on it any more: nothing is rescheduled
    assert w.done and await w.wait() == 1


async def test_one_caller_at_a_time() -> None:
    w = Waiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="one task"):
            await w.wait()
        w.resolve(None)
