"""Large snapshot transfers interrupted while really in flight (64 MiB, real gRPC on loopback,
real files): nothing is left running, open, half-written or handed to the engine.

Each test knows the transfer is in flight from a hold on the file I/O seam of the exchange that
moves the bytes (``Hold`` on the spool's writes or on the ``.fsm`` file's reads, reached once
enough bytes have passed); the side that must stay busy is held there until the test releases
it, so nothing depends on timing. A hold released in advance only marks that its call was made.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.transport.conftest import grpc_pair
from tests.transport.snapshot_helpers import (
    FSM_FILES,
    SPOOL_WRITES,
    ProbedExchange,
    fsm_name,
    open_files_under,
    portal_tasks,
    released_at_exit,
    snap_msg,
    spools,
    write_fsm,
)
from trio_raft.errors import DispatchError, TransportClosedError
from trio_raft.testing.faults import Hold

SIZE = 64 << 20
CHUNK = 1 << 20
INDEX = 40


def _marker(hold: Hold) -> Hold:
    """``hold`` released in advance: it never blocks, it only marks that its call was made."""
    hold.release()
    return hold


@pytest.fixture(scope="module")
def big_payload() -> bytes:
    return os.urandom(SIZE)


@pytest.mark.parametrize("how", ["close", "detach"])
async def test_receiver_stops_during_a_large_incoming_snapshot(
        tmp_path: Path, big_payload: bytes, how: str) -> None:
    # The receiver has spooled 8 MiB; the sender is held after reading 16 MiB.
    src = ProbedExchange(tmp_path / "src")
    dst = ProbedExchange(tmp_path / "dst")
    received = _marker(dst.io.add(Hold("write", path=SPOOL_WRITES, after=8)))
    read = src.io.add(Hold("readinto", path=FSM_FILES, after=16))
    token = write_fsm(tmp_path / "src", INDEX, big_payload)
    outcome: list[BaseException] = []

    async def send() -> None:
        try:
            await a.send_snapshot(snap_msg(INDEX, token))
        except (DispatchError, TransportClosedError) as exc:
            outcome.append(exc)

    async with grpc_pair(snapshot_chunk_bytes=CHUNK, a_snapshots=src, b_snapshots=dst) as (
            a, b, inbox), released_at_exit(src.io):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.fail_after(60):
                await received.wait_reached()
                await read.wait_reached()
            # Really in flight: the landing task runs and holds its spool file open.
            assert b.incoming_transfers() == 1
            [spool] = spools(tmp_path / "dst")
            assert open_files_under(tmp_path / "dst") == [str(tmp_path / "dst" / spool)]
            if how == "close":
                await b.aclose()
            else:
                await b.detach()
            # Gone, as soon as close/detach returned:
            assert b.incoming_transfers() == 0
            assert open_files_under(tmp_path / "dst") == []
            assert spools(tmp_path / "dst") == []
            assert not (tmp_path / "dst" / fsm_name(INDEX)).exists()
            assert dst.protected_indexes() == frozenset()
            assert b.stats()["snapshots_cancelled"] == 1
            if how == "close":
                assert portal_tasks() == []  # no trio task of b's transfer is left
            read.release()
        # The sender's call ended with an error; its file is closed too.
        [err] = outcome
        assert isinstance(err, DispatchError)
        assert err.code == "Unavailable"
        assert open_files_under(tmp_path / "src") == []
        if how == "detach":
            # Still serving: a new engine attaches and the next transfer lands.
            assert b.stats()["snapshots_rejected"] == 1
            b.attach(inbox, dst)
            await a.send_snapshot(snap_msg(INDEX + 1, b"small"))
            await inbox.wait_for(1)
    assert [m.snapshot.metadata.index for m in inbox.messages] == (  # type: ignore[union-attr]
        [INDEX + 1] if how == "detach" else [])


@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_sender_stops_during_a_large_outgoing_snapshot(
        tmp_path: Path, big_payload: bytes, how: str) -> None:
    # The receiver is held after spooling 4 MiB; the sender has read 8 MiB by then (what is
    # in between: the sender's queue and look-ahead, the HTTP/2 windows, the receiver's pipe).
    src = ProbedExchange(tmp_path / "src")
    dst = ProbedExchange(tmp_path / "dst")
    received = dst.io.add(Hold("write", path=SPOOL_WRITES, after=4))
    read = _marker(src.io.add(Hold("readinto", path=FSM_FILES, after=8)))
    token = write_fsm(tmp_path / "src", INDEX, big_payload)
    outcome: list[BaseException] = []
    async with grpc_pair(snapshot_chunk_bytes=CHUNK, a_snapshots=src, b_snapshots=dst) as (
            a, b, inbox), released_at_exit(dst.io):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def send() -> None:
                    try:
                        await a.send_snapshot(snap_msg(INDEX, token))
                    except (DispatchError, TransportClosedError) as exc:
                        outcome.append(exc)
                nursery.start_soon(send)
                with trio.fail_after(60):
                    await received.wait_reached()
                    await read.wait_reached()
                assert open_files_under(tmp_path / "src") == [
                    str(tmp_path / "src" / fsm_name(INDEX))]
                if how == "cancel":
                    scope.cancel()
                else:
                    await a.aclose()
        # The sender is done: its payload file is closed, its stream task is gone.
        assert open_files_under(tmp_path / "src") == []
        assert [p.closed for p in src.outgoing] == [True]
        if how == "cancel":
            assert outcome == []  # cancellation is not an error...
            assert a.dispatch_error_count() == 0  # ...and is not counted
            assert a._client is not None and not a._client._snapshot_tasks
        else:
            assert [type(e) for e in outcome] == [TransportClosedError]
        received.release()
        await b.detach()  # returns once the receiver's transfer is gone
        assert inbox.messages == []
        assert open_files_under(tmp_path / "dst") == []
        assert spools(tmp_path / "dst") == []
        assert not (tmp_path / "dst" / fsm_name(INDEX)).exists()
        assert dst.protected_indexes() == frozenset()
