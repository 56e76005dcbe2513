"""Fatal errors end the engine: waiters learn their outcome is unknown (the fatal error as
cause), applied stops before the bad entry, and the error leaves ``open_engine`` as itself."""

from __future__ import annotations

import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_single_node import cfg
from trio_raft import State, errors


class Halt:
    def __init__(self, err: BaseException | None) -> None:
        self.err = err

    def halt_apply(self) -> BaseException | None:
        return self.err


class HaltingKV(KV):
    """``b"halt"`` returns a response asking apply to halt; ``b"soft"`` one that does not."""

    def apply(self, data: bytes):
        if data == b"halt":
            return Halt(RuntimeError("disk of the FSM is gone"))
        if data == b"soft":
            return Halt(None)
        if data == b"crash":
            raise ValueError("bug in the state machine")
        return super().apply(data)


async def test_halt_apply_is_fatal(tmp_path):
    fsm = HaltingKV()
    seen: list[BaseException] = []
    engine_ref: list[trio_raft.Engine] = []
    with pytest.raises(errors.FSMApplyHaltError):
        async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
            engine_ref.append(engine)
            r = await engine.propose(b"soft")  # a None halt continues normally
            assert isinstance(r.response, Halt)
            before = engine.applied_index()
            try:
                await engine.propose(b"halt")
            except errors.EngineFailedError as exc:
                seen.append(exc)
            await trio.sleep_forever()  # cancelled by the engine's failure
    engine = engine_ref[0]
    assert len(seen) == 1
    assert isinstance(seen[0], errors.OutcomeUnknownError)
    assert isinstance(seen[0].__cause__, errors.FSMApplyHaltError)
    assert engine.state() is State.SHUTDOWN
    assert engine.applied_index() == before
    assert isinstance(engine.err(), errors.FSMApplyHaltError)
    with pytest.raises(errors.EngineClosedError) as later:  # refused: certainly not applied
        await engine.propose(b"set a 1")
    assert isinstance(later.value, errors.NotAppliedError)
    assert later.value.__cause__ is engine.err()


async def test_exception_in_apply_is_fatal_and_replayed_after_restart(tmp_path):
    fsm = HaltingKV()
    with pytest.raises(ValueError, match="bug in the state machine"):
        async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
            await engine.propose(b"set a 1")
            with pytest.raises(errors.EngineFailedError) as waiter:
                await engine.propose(b"crash")
            assert isinstance(waiter.value.__cause__, ValueError)
    # After a restart the failing entry is replayed, not skipped.
    fsm2 = HaltingKV()
    with pytest.raises(ValueError):
        async with trio_raft.open_engine(cfg(tmp_path, fsm2)):
            pass
    assert fsm2.data == {"a": "1"}
