"""FaultyFileIO's Hold rules: a matching call waits in its worker thread until the test releases
it, the test learns (in trio or in a thread) that it was reached, and nothing stays held."""

from __future__ import annotations

import errno
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

from trio_raft.errors import StorageIOError
from trio_raft.storage.fileutil import replace_file, write_all
from trio_raft.testing.faults import Fault, FaultyFileIO, Hold


def _open(fio: FaultyFileIO, path: Path) -> int:
    return fio.open(str(path), os.O_WRONLY | os.O_CREAT)


async def test_a_held_write_waits_until_released(tmp_path: Path) -> None:
    fio = FaultyFileIO()
    hold = fio.add(Hold("write", path="*.bin", after=1))
    fd = _open(fio, tmp_path / "f.bin")

    def writer() -> None:
        for part in (b"one ", b"two ", b"three"):
            write_all(fd, part, file_io=fio)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, writer)
        with trio.fail_after(30):
            await hold.wait_reached()
        # The second write waits before it reaches the disk; the first is there.
        assert (tmp_path / "f.bin").read_bytes() == b"one "
        assert hold.reached.is_set() and not hold.released
        assert hold.call is not None and hold.call.op == "write" and hold.call.nbytes == 4
        await hold.wait_reached()  # reached already: returns at once
        hold.release()
    fio.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == b"one two three"  # it fires once
    assert fio.held() == [hold.call] and fio.held(hold) == [hold.call]
    assert fio.fired() == []


async def test_a_hold_released_in_advance_only_marks_the_call(tmp_path: Path) -> None:
    fio = FaultyFileIO()
    marker = fio.add(Hold("write", after=2))
    marker.release()
    fd = _open(fio, tmp_path / "f")
    await trio.to_thread.run_sync(partial(write_all, fd, b"abc", file_io=fio))
    assert not marker.reached.is_set()
    for _ in range(2):
        await trio.to_thread.run_sync(partial(write_all, fd, b"abc", file_io=fio))
    fio.close(fd)
    assert marker.reached.is_set()
    await marker.wait_reached()
    assert (tmp_path / "f").read_bytes() == b"abc" * 3


async def test_release_all_frees_held_and_future_calls(tmp_path: Path) -> None:
    done = threading.Event()
    with FaultyFileIO() as fio:
        first = fio.add(Hold("fsync"))
        later = fio.add(Hold("fsync", after=1))
        fd = _open(fio, tmp_path / "f")

        def sync_twice() -> None:
            fio.fsync(fd)
            fio.fsync(fd)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, sync_twice)
            with trio.fail_after(30):
                await first.wait_reached()
            assert not done.is_set()
            fio.release_all()  # what leaving the ``with`` block does, too
    assert done.is_set() and later.reached.is_set() and later.released
    fio.close(fd)


async def test_leaving_the_with_block_releases_a_held_call(tmp_path: Path) -> None:
    outcome: list[str] = []
    hold = Hold("replace")
    fio = FaultyFileIO([hold])

    async def write() -> None:
        await trio.to_thread.run_sync(
            partial(replace_file, tmp_path / "peers", b"x", file_io=fio))
        outcome.append("written")

    # The ``with`` block sits inside the nursery: it must release the call before the nursery
    # waits for the worker thread.
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            with fio:
                nursery.start_soon(write)
                with trio.fail_after(30):
                    await hold.wait_reached()
                raise KeyError("the test failed while a call was held")
    assert info.group_contains(KeyError)
    assert outcome == ["written"]
    assert (tmp_path / "peers").read_bytes() == b"x"


async def test_a_held_call_can_fail_once_released(tmp_path: Path) -> None:
    fio = FaultyFileIO([Hold("fsync"), Fault("fsync", error=errno.ENOSPC)])
    hold = fio.faults[0]
    assert isinstance(hold, Hold)
    fd = _open(fio, tmp_path / "f")
    async with trio.open_nursery() as nursery:
        async def sync() -> None:
            with pytest.raises(OSError) as info:
                await trio.to_thread.run_sync(fio.fsync, fd)
            assert info.value.errno == errno.ENOSPC

        nursery.start_soon(sync)
        with trio.fail_after(30):
            await hold.wait_reached()
        hold.release()
    fio.close(fd)
    [call] = fio.fired()
    assert call.hold is hold and call.fault is not None


async def test_an_unreleased_hold_times_out_into_a_storage_error(tmp_path: Path) -> None:
    fio = FaultyFileIO([Hold("replace", timeout=0.05)])
    with pytest.raises(StorageIOError) as info:
        await trio.to_thread.run_sync(
            partial(replace_file, tmp_path / "peers", b"x", file_io=fio))
    assert info.value.errno == errno.ETIMEDOUT
    hold = fio.faults[0]
    assert isinstance(hold, Hold) and hold.timed_out
    assert os.listdir(tmp_path) == []  # the temporary file was removed


async def test_a_hold_on_the_trio_thread_refuses_to_block(tmp_path: Path) -> None:
    fio = FaultyFileIO([Hold("open")])
    with pytest.raises(RuntimeError, match="trio thread"):
        _open(fio, tmp_path / "f")
    assert not (tmp_path / "f").exists()


async def test_waiting_for_a_hold_can_be_cancelled(tmp_path: Path) -> None:
    fio = FaultyFileIO()
    hold = fio.add(Hold("fstat"))
    with trio.move_on_after(0.01) as scope:
        await hold.wait_reached()
    assert scope.cancelled_caught and not hold.reached.is_set()
    # The call reached later wakes no one and is not disturbed by the waiter that left.
    hold.release()
    fd = _open(fio, tmp_path / "f")
    st = await trio.to_thread.run_sync(fio.fstat, fd)
    fio.close(fd)
    assert st.st_size == 0 and hold.reached.is_set()
    with trio.fail_after(30):
        await hold.wait_reached()


def test_hold_validates_like_a_fault() -> None:
    with pytest.raises(ValueError, match="unknown file-I/O operation"):
        Hold("scribble")
    with pytest.raises(ValueError):
        Hold("write", after=-1)
