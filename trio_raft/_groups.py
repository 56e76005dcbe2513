"""Exceptions out of the context managers trio_raft exports (internal helpers).

A context manager that owns a nursery (``open_engine``, ``Factory.create``, the testing
cluster, ``GRPCTransport``'s ``async with``) runs the caller's block inside that nursery. With
trio's strict exception groups every exception leaving the nursery arrives wrapped in a
``BaseExceptionGroup``, so ``except KeyError:`` around the block would never match the block's
own ``KeyError``. These helpers take the group apart again: cancellations are dropped (they are
the consequence of the failure, or an outer cancel scope's business), a single remaining failure
is raised as itself, and a group is kept only when several independent failures really happened.

Raise the result *outside* the ``except`` clause that caught the group, so the exception's own
``__context__`` is not replaced by the group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def sole_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to raise for ``group`` (see the module docstring): its only non-cancellation
    member, a cancellation when that is all it holds, or the group minus its cancellations."""
    members = list(group.exceptions)
    real = [e for e in members if not isinstance(e, trio.Cancelled)]
    if not real:
        return members[0]
    if len(real) == 1:
        return real[0]
    if len(real) == len(members):
        return group
    return group.derive(real)


def caused_by(exc: BaseException, root: BaseException) -> bool:
    """Whether ``root`` is ``exc`` or in its chain of causes and contexts."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if cur is root:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


@asynccontextmanager
async def open_owning_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for a context manager that runs its caller's block inside it: what leaves it
    is the block's (or a task's) exception as itself, unless several failed independently."""
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        failure = sole_failure(group)
    if failure is not None:
        raise failure
