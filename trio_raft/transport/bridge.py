"""An asyncio event loop in a thread, driven from trio (and calling back into trio).

grpclib is an asyncio library. The gRPC transport runs it on one private asyncio loop in a
dedicated thread that the trio side starts and stops (see ``notes/stack_measurements.md``: this
matched plain asyncio speed and beat trio-asyncio). Two crossings exist:

* trio -> asyncio: :meth:`AsyncioBridge.run` runs a coroutine function on the loop and waits for
  it. Cancelling the trio caller cancels the asyncio task, and the caller waits (briefly) until the
  task has really stopped, so nothing outlives its caller; then ``trio.Cancelled`` propagates.
* asyncio -> trio: :meth:`TrioPortal.run`, called from a coroutine on the loop, runs an async
  function as a task in a trio nursery that the trio side owns and awaits its result. Cancelling
  the asyncio caller cancels the trio task. ``Exception`` results cross back to asyncio; trio's
  own ``Cancelled`` and other ``BaseException`` stay in trio (the asyncio caller then gets
  :class:`~trio_raft.errors.TransportClosedError`).

Shutdown (:meth:`AsyncioBridge.aclose`) cancels every task still on the loop and waits for them,
closes leftover sockets, shuts down the loop's executor, stops and closes the loop and joins the
thread. Any trio caller still waiting afterwards gets ``TransportClosedError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import outcome
import trio

from trio_raft.errors import TransportClosedError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long shutdown waits for cancelled asyncio tasks to finish.
SHUTDOWN_GRACE = 0.5


@attrs.define(eq=False, slots=True)
class _Call:
    """One trio -> asyncio call in flight."""

    trio_task: Any
    aio_task: asyncio.Task[Any] | None = None
    cancel_requested: bool = False
    done: bool = False


class AsyncioBridge:
    """Owns one asyncio loop running in one thread. Start with :meth:`start`, stop with
    :meth:`aclose` (both from trio); or use ``async with AsyncioBridge() as bridge``."""

    def __init__(self, *, name: str = "trio-raft-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._state = "new"
        self._calls: set[_Call] = set()
        self._stopped: trio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise TransportClosedError("asyncio bridge is not started")
        return self._loop

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    async def __aenter__(self) -> AsyncioBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"asyncio bridge cannot start twice (state {self._state})")
        self._state = "starting"
        token = trio.lowlevel.current_trio_token()
        # A plain selector loop, not asyncio.new_event_loop(): an import of trio_asyncio anywhere
        # in the process patches the policy (see the stack notes).
        loop = asyncio.SelectorEventLoop()
        started = trio.Event()
        stopped = trio.Event()

        def announce_started() -> None:
            token.run_sync_soon(started.set)

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.call_soon(announce_started)
                loop.run_forever()
            except BaseException:
                log.exception("asyncio bridge loop crashed")
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                except BaseException:
                    log.exception("asyncio bridge loop did not shut down cleanly")
                finally:
                    asyncio.set_event_loop(None)
                    loop.close()
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(stopped.set)

        thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._loop, self._token, self._thread, self._stopped = loop, token, thread, stopped
        thread.start()
        with trio.CancelScope(shield=True):
            await started.wait()
        self._state = "running"

    # -- trio -> asyncio ------------------------------------------------------------------------

    async def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` as a task on the loop and return its result (or raise its
        exception) in trio. Cancellable: see the module docstring."""
        if self._state != "running":
            raise TransportClosedError("asyncio bridge is not running")
        loop, token = self._loop, self._token
        assert loop is not None and token is not None
        call = _Call(trio.lowlevel.current_task())
        calls = self._calls

        def deliver(result: outcome.Outcome[Any]) -> None:  # trio thread
            if call.done:
                return
            call.done = True
            calls.discard(call)
            trio.lowlevel.reschedule(call.trio_task, outcome.Value(result))

        def post(result: outcome.Outcome[Any]) -> None:  # asyncio thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver, result)

        def on_done(task: asyncio.Task[Any]) -> None:  # asyncio thread
            if task.cancelled():
                post(outcome.Error(asyncio.CancelledError()))
                return
            exc = task.exception()
            post(outcome.Error(exc) if exc is not None else outcome.Value(task.result()))

        def start_in_loop() -> None:  # asyncio thread
            if call.cancel_requested:
                post(outcome.Error(asyncio.CancelledError()))
                return
            try:
                task: asyncio.Task[Any] = loop.create_task(async_fn(*args))  # type: ignore[arg-type]
            except BaseException as exc:
                post(outcome.Error(exc))
                return
            call.aio_task = task
            task.add_done_callback(on_done)

        def cancel_in_loop() -> None:  # asyncio thread
            call.cancel_requested = True
            if call.aio_task is not None:
                call.aio_task.cancel()

        try:
            loop.call_soon_threadsafe(start_in_loop)
        except RuntimeError:
            raise TransportClosedError("asyncio bridge loop is closed") from None
        calls.add(call)

        raise_cancel: list[Callable[[], Any]] = []

        def abort(rc: Callable[[], Any]) -> trio.lowlevel.Abort:
            raise_cancel.append(rc)
            # If the loop is already closed, aclose() delivers TransportClosedError.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(cancel_in_loop)
            # The asyncio task may still finish normally; we wait for whatever it reports.
            return trio.lowlevel.Abort.FAILED

        result: outcome.Outcome[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        if isinstance(result, outcome.Error) and isinstance(result.error,
                                                            asyncio.CancelledError):
            if raise_cancel:
                raise_cancel[0]()  # raises trio.Cancelled (or KeyboardInterrupt)
            raise TransportClosedError("asyncio task cancelled by transport shutdown")
        return result.unwrap()

    def run_sync_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop without waiting (no-op once closed)."""
        if self._loop is None or self._state not in ("running", "closing"):
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    # -- shutdown -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel every task on the loop, stop and close it, join the thread. Idempotent."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            assert self._stopped is not None
            with trio.CancelScope(shield=True):
                await self._stopped.wait()
            return
        self._state = "closing"
        loop, thread, stopped = self._loop, self._thread, self._stopped
        assert loop is not None and thread is not None and stopped is not None

        def begin_shutdown() -> None:
            loop.create_task(_shutdown_loop(loop))

        with trio.CancelScope(shield=True):
            with contextlib.suppress(RuntimeError):  # the loop may already have died
                loop.call_soon_threadsafe(begin_shutdown)
            if thread.is_alive():
                await stopped.wait()
            thread.join()
        self._state = "closed"
        for call in list(self._calls):
            if not call.done:
                call.done = True
                trio.lowlevel.reschedule(
                    call.trio_task, outcome.Value(outcome.Error(TransportClosedError()))
                )
        self._calls.clear()


async def _shutdown_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Runs on the loop: cancel all other tasks, wait for them, close leftover transports, stop."""
    me = asyncio.current_task()
    try:
        deadline = loop.time() + SHUTDOWN_GRACE
        while True:
            tasks = [t for t in asyncio.all_tasks(loop) if t is not me and not t.done()]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("asyncio bridge: %d task(s) ignored cancellation at shutdown",
                            len(tasks))
                break
            await asyncio.wait(tasks, timeout=remaining)
        _close_leftover_transports(loop)
        # Let connection_lost callbacks run.
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.stop()


def _close_leftover_transports(loop: asyncio.AbstractEventLoop) -> None:
    """Close sockets still registered with a selector loop (e.g. server-side connections of a
    grpclib Server the application owns), so none is garbage-collected open."""
    transports = getattr(loop, "_transports", None)
    if transports is None:
        return
    for transport in list(transports.values()):
        try:
            if not transport.is_closing():
                transport.abort()
        except Exception:  # pragma: no cover - best effort
            log.debug("closing leftover transport failed", exc_info=True)


class _Batcher:
    """Coalesces cross-thread hand-offs: calls posted while a drain is already scheduled ride
    along with it, so a burst of calls costs one wake-up of the other thread instead of one per
    call (each wake-up is a socket write and a context switch)."""

    def __init__(self, schedule: Callable[[Callable[[], None]], Any]) -> None:
        self._schedule = schedule
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._schedule(self._drain)
        except BaseException:
            with self._lock:
                self._scheduled = False
                with contextlib.suppress(ValueError):
                    self._items.remove((fn, args))
            raise

    def _drain(self) -> None:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._scheduled = False
        for fn, args in items:
            fn(*args)


class TrioPortal:
    """Calls from coroutines on the bridge's loop into a trio nursery.

    Create it in trio (it captures the current trio token); use :meth:`run` from asyncio.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._to_trio = _Batcher(self._token.run_sync_soon)
        self._to_asyncio: dict[asyncio.AbstractEventLoop, _Batcher] = {}

    def _asyncio_batcher(self, loop: asyncio.AbstractEventLoop) -> _Batcher:
        b = self._to_asyncio.get(loop)
        if b is None:
            b = self._to_asyncio[loop] = _Batcher(loop.call_soon_threadsafe)
        return b

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: run the synchronous ``fn(*args)`` in the trio thread soon (FIFO
        with other calls). ``fn`` must not raise."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise TransportClosedError("trio run has finished") from None

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: like :meth:`call_soon`, but calls posted while a hand-off is
        already pending ride along with it (one wake-up of the trio thread per burst). FIFO
        with other posts and with :meth:`run`'s hand-offs. ``fn`` must not raise."""
        try:
            self._to_trio.post(fn, *args)
        except trio.RunFinishedError:
            raise TransportClosedError("trio run has finished") from None

    def post_to_loop(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
                     *args: Any) -> None:
        """From the trio thread: run the synchronous ``fn(*args)`` on ``loop`` soon, coalesced
        like :meth:`post`. Dropped when the loop is already closed (nobody is waiting)."""
        try:  # not contextlib.suppress: this runs once per answered proposal
            self._asyncio_batcher(loop).post(fn, *args)
        except RuntimeError:
            return

    async def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: run ``async_fn(*args)`` in the trio nursery and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()
        token = self._token
        nursery = self._nursery
        to_asyncio = self._asyncio_batcher(loop)

        def settle(result: outcome.Outcome[T]) -> None:  # asyncio thread
            if fut.done():
                return
            if isinstance(result, outcome.Value):
                fut.set_result(result.value)
            elif isinstance(result, outcome.Error):
                fut.set_exception(result.error)

        def report(result: outcome.Outcome[T]) -> None:  # trio thread
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                to_asyncio.post(settle, result)

        async def runner() -> None:  # trio thread
            result: outcome.Outcome[T] | None = None
            try:
                with scope:
                    result = outcome.Value(await async_fn(*args))
            except Exception as exc:
                result = outcome.Error(exc)
            finally:
                if result is None:
                    result = outcome.Error(TransportClosedError("trio side cancelled the call"))
                report(result)

        def spawn() -> None:  # trio thread
            try:
                nursery.start_soon(runner)
            except RuntimeError:
                report(outcome.Error(TransportClosedError("trio nursery is closed")))

        try:
            self._to_trio.post(spawn)
        except trio.RunFinishedError:
            raise TransportClosedError("trio run has finished") from None
        try:
            return await fut
        except asyncio.CancelledError:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)
            raise
