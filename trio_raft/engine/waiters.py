"""One-shot result slots that callers await while the run loop works on their request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import outcome
import trio

log = logging.getLogger(__name__)


class Waiter:
    """Resolved (or failed) exactly once by the run loop; awaited by one caller."""

    __slots__ = ("_error", "_event", "_result", "target", "wait_applied")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        #: Read requests: the read index once raft answered (0 while unknown).
        self.target = 0
        self.wait_applied = True

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, value: Any) -> None:
        if not self._event.is_set():
            self._result = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._result


class CallbackWaiter(Waiter):
    """A waiter nobody awaits: resolving or failing it calls ``on_done`` with the outcome, once,
    in the trio thread (no task, no event). An exception from ``on_done`` is logged, never
    raised into the run loop."""

    __slots__ = ("_fired", "_on_done")

    def __init__(self, on_done: Callable[[outcome.Outcome[Any]], object]) -> None:
        self._on_done = on_done
        self._fired = False
        self.target = 0
        self.wait_applied = True

    @property
    def done(self) -> bool:
        return self._fired

    def _fire(self, result: outcome.Outcome[Any]) -> None:
        if self._fired:
            return
        self._fired = True
        try:
            self._on_done(result)
        except Exception:
            log.exception("proposal completion callback failed")

    def resolve(self, value: Any) -> None:
        self._fire(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        self._fire(outcome.Error(error))

    async def wait(self) -> Any:
        raise RuntimeError("a CallbackWaiter reports through its callback; nothing to await")


class WaiterTable:
    """Request id -> Waiter, with bulk failure (leader loss, close, fatal error)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[int, Waiter] = {}

    def add(self, key: int, w: Waiter) -> None:
        self._items[key] = w

    def pop(self, key: int) -> Waiter | None:
        return self._items.pop(key, None)

    def get(self, key: int) -> Waiter | None:
        return self._items.get(key)

    def discard(self, key: int, w: Waiter) -> None:
        if self._items.get(key) is w:
            del self._items[key]

    def fail_all(self, error_factory: Any) -> None:
        items, self._items = self._items, {}
        for w in items.values():
            w.fail(error_factory())

    def items(self) -> list[tuple[int, Waiter]]:
        return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: int) -> bool:
        return key in self._items
