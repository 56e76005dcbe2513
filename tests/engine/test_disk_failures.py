"""Fail-stop on disk errors: a failed WAL or snapshot write or fsync stops the engine with a
typed fatal error, nothing that is not durable is acknowledged, a failed fsync is never
retried, and a restart after the disk is fixed finds every acknowledged write.

Faults come from ``FaultyFileIO`` through ``OpenConfig.file_io`` (single node, and 3-node
in-process clusters), and from a real full file system (a small tmpfs, needs root)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.testing.cluster import open_memory_cluster
from trio_raft.testing.faults import Fault, FaultyFileIO


async def write_until_failure(engine: trio_raft.Engine, acked: dict[str, str], start: int,
                              count: int, value: str = "v") -> BaseException:
    """Propose until one proposal fails; every acknowledged one lands in ``acked``."""
    for i in range(start, start + count):
        try:
            await engine.propose(f"set k{i} {value}{i}".encode())
        except errors.RaftError as exc:
            return exc
        acked[f"k{i}"] = f"{value}{i}"
    raise AssertionError("no proposal failed")


@pytest.mark.parametrize(("op", "path", "err", "fatal"), [
    ("fdatasync", "*.wal", errno.EIO, errors.WALIOError),
    ("write", "*.wal", errno.ENOSPC, errors.WALIOError),
    ("write", "*.fsm.tmp", errno.ENOSPC, errors.StorageIOError),  # a snapshot write
    ("fsync", "*/snap/*.snap.tmp-*", errno.EIO, errors.StorageIOError),
])
async def test_a_single_node_stops_and_restarts_with_every_acknowledged_write(
        tmp_path, op, path, err, fatal):
    fio = FaultyFileIO()
    acked: dict[str, str] = {}
    engine_ref: list[trio_raft.Engine] = []
    with pytest.raises(fatal) as raised:
        async with trio_raft.open_engine(cfg(tmp_path, KV(), file_io=fio,
                                             snapshot_every=8)) as engine:
            engine_ref.append(engine)
            for i in range(5):
                await engine.propose(b"set k%d v%d" % (i, i))
                acked[f"k{i}"] = f"v{i}"
            fault = fio.add(Fault(op, path=path, error=err))
            failure = await write_until_failure(engine, acked, 5, 100)
            # the proposal that met the failure: outcome unknown, caused by the disk error
            assert isinstance(failure, errors.OutcomeUnknownError | errors.EngineClosedError)
            assert isinstance(failure.__cause__, fatal)
            await trio.sleep_forever()  # the engine's failure ends the block
    assert raised.value.errno == err
    engine = engine_ref[0]
    assert engine.state() is trio_raft.State.SHUTDOWN and engine.err() is raised.value
    assert len(fio.fired(fault)) == 1
    if op == "fdatasync":  # never retried: nothing synced that WAL after the failure
        failed_at = fio.calls.index(fio.fired(fault)[0])
        assert not [c for c in fio.calls[failed_at + 1:] if c.op in ("fdatasync", "fsync")
                    and c.path.endswith(".wal")]
    # The disk is fixed: a restart finds every acknowledged write.
    fsm = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        assert all(fsm.data[k] == v for k, v in acked.items())
        await engine.propose(b"set after 1")


@pytest.mark.parametrize("who", ["leader", "follower"])
async def test_a_failed_fsync_in_a_cluster_stops_only_that_node(tmp_path, clock, who):
    acked: dict[str, str] = {}
    async with open_memory_cluster(tmp_path, ["n1", "n2", "n3"], KV, start=False) as c:
        fios = {n: FaultyFileIO() for n in ("n1", "n2", "n3")}
        for n in ("n1", "n2", "n3"):
            await c.start(n, file_io=fios[n])
        leader = await c.wait_for_leader()
        for i in range(10):
            await leader.propose(b"set k%d v%d" % (i, i))
            acked[f"k{i}"] = f"v{i}"
        lname = c.leader_name()
        assert lname is not None
        victim = lname if who == "leader" else next(n for n in c.nodes if n != lname)
        fios[victim].add(Fault("fdatasync", path="*.wal", error=errno.EIO))
        if who == "leader":
            failure = await write_until_failure(leader, acked, 10, 50)
            assert isinstance(failure, errors.OutcomeUnknownError)  # may have committed
            assert isinstance(failure.__cause__, errors.WALIOError)
            with trio.fail_after(30):
                await c.nodes[victim].stopped.wait()
            leader = await c.wait_for_leader(exclude=victim)
        else:
            with trio.fail_after(30):
                i = 10
                while not c.nodes[victim].stopped.is_set():
                    await leader.propose(b"set k%d v%d" % (i, i))  # two of three: commits
                    acked[f"k{i}"] = f"v{i}"
                    i += 1
        assert isinstance(c.nodes[victim].error, errors.WALIOError)
        for i in range(100, 110):  # the other two go on
            await leader.propose(b"set k%d v%d" % (i, i))
            acked[f"k{i}"] = f"v{i}"
        await c.start(victim, file_io=FaultyFileIO())  # the disk is fixed
        res = await leader.propose(b"set last 1")
        await c.wait_applied(res.commit_index)
        for h in c.nodes.values():
            assert all(h.fsm.data[k] == v for k, v in acked.items()), h.name


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); not permitted here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


async def test_a_full_file_system_stops_the_engine(small_fs: Path) -> None:
    (small_fs / "filler").write_bytes(b"\xff" * (1 << 20))  # freed once the disk is "fixed"
    acked: dict[str, str] = {}
    big = "x" * 8000
    with pytest.raises(errors.StorageIOError) as raised:
        async with trio_raft.open_engine(cfg(small_fs, KV(), snapshot_every=100)) as engine:
            await write_until_failure(engine, acked, 0, 10_000, value=big)
            await trio.sleep_forever()
    assert raised.value.errno == errno.ENOSPC
    assert len(acked) > 50  # the disk did take a good part of it
    (small_fs / "filler").unlink()
    fsm = KV()
    async with trio_raft.open_engine(cfg(small_fs, fsm)) as engine:
        assert all(fsm.data[k] == v for k, v in acked.items())
        await engine.propose(b"set after 1")
        assert fsm.data["after"] == "1"
