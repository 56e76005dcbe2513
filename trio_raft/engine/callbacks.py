"""Leader-acquired / leader-lost callbacks with per-registration deregistration."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class CallbackRegistry:
    def __init__(self, name: str) -> None:
        self._name = name
        self._ids = itertools.count(1)
        self._fns: dict[int, Callable[[], object]] = {}

    def register(self, fn: Callable[[], object] | None) -> Callable[[], None]:
        """Register ``fn``; returns an idempotent function removing this registration only."""
        if fn is None:
            return lambda: None
        key = next(self._ids)
        self._fns[key] = fn

        def deregister() -> None:
            self._fns.pop(key, None)

        return deregister

    def fire(self) -> None:
        """Run every callback synchronously; an exception is logged and the rest still run."""
        for fn in list(self._fns.values()):
            try:
                fn()
            except Exception:
                logger.exception("%s callback raised", self._name)

    def __len__(self) -> int:
        return len(self._fns)
