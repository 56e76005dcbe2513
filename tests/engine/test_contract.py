"""The edges of the public contract (docs/api.md): exceptions leave ``open_engine`` and the
other context managers as themselves; "not applied" and "outcome unknown" are two separate
families; a fatal error reaches each waiter as a fresh outcome-unknown error and leaves the
block once, as itself."""

from __future__ import annotations

import inspect
import traceback

import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_fatal import HaltingKV
from trio_raft import errors
from trio_raft.testing.cluster import open_memory_cluster

from .test_single_node import cfg


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt and its kind: not an Exception."""


async def test_block_exception_arrives_as_itself(tmp_path):
    with pytest.raises(KeyError) as caught:
        async with trio_raft.open_engine(cfg(tmp_path)) as engine:
            await engine.propose(b"set a 1")
            raise KeyError("mine")
    assert type(caught.value) is KeyError and caught.value.args == ("mine",)
    assert engine.state() is trio_raft.State.SHUTDOWN
    # Caught by a plain except clause, as a user writes it.
    try:
        async with trio_raft.open_engine(cfg(tmp_path)):
            raise ValueError("plain")
    except ValueError as exc:
        assert str(exc) == "plain"


async def test_base_exception_arrives_as_itself(tmp_path):
    with pytest.raises(Interrupt):
        async with trio_raft.open_engine(cfg(tmp_path)) as engine:
            await engine.propose(b"set a 1")
            raise Interrupt()


async def test_outside_cancellation_exits_quietly(tmp_path):
    with trio.move_on_after(5) as scope:
        async with trio_raft.open_engine(cfg(tmp_path)) as engine:
            await engine.propose(b"set a 1")
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert engine.state() is trio_raft.State.SHUTDOWN


async def test_fatal_error_inside_the_block_arrives_as_itself(tmp_path):
    waiter: list[BaseException] = []

    async def halt(engine: trio_raft.Engine) -> None:
        try:
            await engine.propose(b"halt")
        except errors.EngineFailedError as exc:
            waiter.append(exc)

    with pytest.raises(errors.FSMApplyHaltError) as caught:
        async with (trio_raft.open_engine(cfg(tmp_path, HaltingKV())) as engine,
                    trio.open_nursery() as n):
            n.start_soon(halt, engine)
            await trio.sleep_forever()  # the engine's failure cancels the block
    assert caught.value is engine.err()
    assert len(waiter) == 1 and waiter[0].__cause__ is caught.value


async def test_fatal_error_after_a_block_that_handled_its_waiter(tmp_path):
    """The block swallowed its waiter's error and ended normally: the fatal error still
    leaves the block, once, as itself."""
    with pytest.raises(errors.FSMApplyHaltError):
        async with trio_raft.open_engine(cfg(tmp_path, HaltingKV())) as engine:
            with pytest.raises(errors.EngineFailedError):
                await engine.propose(b"halt")


async def test_independent_failures_make_a_group(tmp_path):
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio_raft.open_engine(cfg(tmp_path, HaltingKV())) as engine:
            with pytest.raises(errors.EngineFailedError):
                await engine.propose(b"halt")
            raise KeyError("unrelated")
    kinds = {type(e) for e in caught.value.exceptions}
    assert kinds == {errors.FSMApplyHaltError, KeyError}


async def test_each_waiter_gets_a_fresh_outcome_unknown_error(tmp_path, clock):
    """Several waiters in raft when the fatal error happens: each gets its own
    EngineFailedError caused by the fatal error; the fatal error's traceback does not grow."""
    async with open_memory_cluster(tmp_path, 3, HaltingKV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        assert name is not None
        c.isolate(name)  # proposals wait in raft: no quorum
        got: list[BaseException] = []

        async def propose(data: bytes) -> None:
            try:
                await leader.propose(data)
            except errors.RaftError as exc:
                got.append(exc)

        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(propose, b"set k%d 1" % i)
            await trio.testing.wait_all_tasks_blocked()
            leader._loop.fail(RuntimeError("injected fatal"))  # white box: a fatal error
        fatal = leader.err()
        assert isinstance(fatal, RuntimeError)
        assert len(got) == 3 and len({id(e) for e in got}) == 3
        for exc in got:
            assert isinstance(exc, errors.EngineFailedError)
            assert isinstance(exc, errors.OutcomeUnknownError)
            assert exc.__cause__ is fatal
        depth = len(traceback.extract_tb(fatal.__traceback__)) if fatal.__traceback__ else 0
        for _ in range(3):
            with pytest.raises(errors.EngineClosedError) as later:
                await leader.propose(b"set late 1")
            assert later.value.__cause__ is fatal
        after = len(traceback.extract_tb(fatal.__traceback__)) if fatal.__traceback__ else 0
        assert after == depth
        await c.stop(name)
        assert isinstance(c.nodes[name].error, RuntimeError)


async def test_close_under_a_waiter_is_outcome_unknown(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        assert name is not None
        c.isolate(name)
        outcome: list[BaseException] = []

        async def propose() -> None:
            try:
                await leader.propose(b"set k 1")
            except errors.RaftError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(propose)
            await trio.testing.wait_all_tasks_blocked()
            await leader.aclose()
        assert len(outcome) == 1
        assert isinstance(outcome[0], errors.OutcomeUnknownError)
        # A call made after the close certainly did not happen.
        with pytest.raises(errors.NotAppliedError):
            await leader.propose(b"set k 2")
        with pytest.raises(errors.EngineClosedError):
            await leader.linearizable_read()


def test_the_two_families_never_mix():
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, errors.RaftError)]
    assert errors.LeadershipLostError in classes
    for cls in classes:
        assert not (issubclass(cls, errors.NotAppliedError)
                    and issubclass(cls, errors.OutcomeUnknownError)), cls
    assert not issubclass(errors.LeadershipLostError, errors.NotLeaderError)
    not_applied = (errors.NotLeaderError, errors.LeadershipTransferInProgressError,
                   errors.EnvelopeCutoverInProgressError, errors.EngineClosedError,
                   errors.ConfigIndexMismatchError, errors.MembershipChangePendingError,
                   errors.TooManyPendingConfigsError, errors.PromoteLearnerNotCaughtUpError)
    unknown = (errors.LeadershipLostError, errors.EngineClosedWhileWaitingError,
               errors.EngineFailedError)
    assert all(issubclass(c, errors.NotAppliedError) for c in not_applied)
    assert all(issubclass(c, errors.OutcomeUnknownError) for c in unknown)


async def test_factory_and_cluster_helpers_pass_exceptions_through(tmp_path, clock):
    factory = trio_raft.Factory()
    with pytest.raises(KeyError):
        async with factory.create(cfg(tmp_path / "f")):
            raise KeyError("factory")
    with pytest.raises(KeyError):
        async with open_memory_cluster(tmp_path / "c", 3, KV) as c:
            await c.wait_for_leader()
            raise KeyError("cluster")
