"""The asyncio-loop-in-a-thread bridge."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from trio_raft.errors import TransportClosedError
from trio_raft.transport.bridge import AsyncioBridge, TrioPortal


def bridge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trio-raft-asyncio"]


async def test_run_returns_and_raises() -> None:
    async with AsyncioBridge() as bridge:
        async def add(x: int, y: int) -> int:
            await asyncio.sleep(0)
            assert threading.current_thread().name == "trio-raft-asyncio"
            return x + y

        async def boom() -> None:
            raise KeyError("k")

        assert await bridge.run(add, 2, 3) == 5
        with pytest.raises(KeyError):
            await bridge.run(boom)
        assert len(bridge_threads()) == 1
    assert bridge_threads() == []
    with pytest.raises(TransportClosedError):
        await bridge.run(add, 1, 1)


async def test_cancelling_trio_cancels_the_asyncio_task() -> None:
    async with AsyncioBridge() as bridge:
        seen: list[str] = []

        async def sleeper() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        with trio.move_on_after(0.1) as cs:
            await bridge.run(sleeper)
        assert cs.cancelled_caught
        assert seen == ["cancelled"]

        async def stubborn() -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                return "finished anyway"
            return "no"

        # A task that swallows the cancellation still ends the call; trio's Cancelled is raised
        # at the next checkpoint.
        with trio.move_on_after(0.1) as cs:
            await bridge.run(stubborn)
            await trio.lowlevel.checkpoint()
        assert cs.cancelled_caught


async def test_aclose_cancels_pending_calls() -> None:
    bridge = AsyncioBridge()
    await bridge.start()
    results: list[str] = []

    async def forever() -> None:
        await asyncio.sleep(30)

    async def caller() -> None:
        try:
            await bridge.run(forever)
        except TransportClosedError:
            results.append("closed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        nursery.start_soon(caller)
        await trio.sleep(0.05)
        t0 = trio.current_time()
        await bridge.aclose()
        assert trio.current_time() - t0 < 3.0
    assert results == ["closed", "closed"]
    assert bridge_threads() == []
    await bridge.aclose()  # idempotent


async def test_portal_round_trip_errors_and_cancellation() -> None:
    async with AsyncioBridge() as bridge, trio.open_nursery() as nursery:
        portal = TrioPortal(nursery)
        trio_side_cancelled = trio.Event()

        async def double(x: int) -> int:
            await trio.sleep(0)
            return 2 * x

        async def fail() -> None:
            raise ValueError("from trio")

        async def block() -> None:
            try:
                await trio.sleep_forever()
            finally:
                trio_side_cancelled.set()

        async def from_asyncio() -> list[object]:
            out: list[object] = [await portal.run(double, 21)]
            try:
                await portal.run(fail)
            except ValueError as exc:
                out.append(str(exc))
            try:
                await asyncio.wait_for(portal.run(block), 0.05)
            except TimeoutError:
                out.append("timeout")
            return out

        assert await bridge.run(from_asyncio) == [42, "from trio", "timeout"]
        with trio.fail_after(2):
            await trio_side_cancelled.wait()

        # Trio-side cancellation (the nursery going away) reaches asyncio as
        # TransportClosedError, never as trio.Cancelled.
        async def wait_in_trio() -> str:
            try:
                await portal.run(trio.sleep_forever)
            except TransportClosedError:
                return "closed"
            return "no"

        async def cancel_soon() -> None:
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_soon)
        with trio.CancelScope(shield=True):
            assert await bridge.run(wait_in_trio) == "closed"
