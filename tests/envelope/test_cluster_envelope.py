"""Envelope cutover under load on a 3-node MemoryNetwork cluster (MockClock), tampering, and a
node restarted without its key."""

from __future__ import annotations

import collections
import contextlib

import attrs
import pytest
import trio

from tests.envelope.helpers import RecordingKV, open_cipher, wal_bytes
from trio_raft import errors
from trio_raft.core.messages import MessageType
from trio_raft.engine.contexts import decode_proposal
from trio_raft.engine.requests import ProposeRequest
from trio_raft.engine.waiters import Waiter
from trio_raft.envelope import is_control, parse
from trio_raft.testing.cluster import open_memory_cluster

NAMES = ["n1", "n2", "n3"]


async def start_all(c, tmp_path, kek):
    ciphers = {n: open_cipher(tmp_path, n, kek) for n in NAMES}
    for n in NAMES:
        await c.start(n, raft_cipher=ciphers[n])
    return ciphers


async def leader_of(c):
    """(the leader's engine, its name) once one is elected."""
    leader = await c.wait_for_leader()
    lname = c.leader_name()
    assert lname is not None
    return leader, lname


def fatal(err: BaseException | None) -> BaseException | None:
    """The engine's fatal error, out of the ExceptionGroup a node's nursery may wrap it in."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    return err


def marker(w: int, j: int) -> bytes:
    return f"MARK-w{w}-{j}-END".encode()


async def test_cutover_under_eight_writers(tmp_path, clock, kek):
    writers, per_writer = 8, 30
    acked: dict[bytes, int] = {}
    barrier_hits = 0
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False) as c:
        ciphers = await start_all(c, tmp_path, kek)
        c.network.set_links(c.ids(NAMES), delay=0.002)  # a round trip takes mock time
        leader, lname = await leader_of(c)
        started = trio.Event()

        async def writer(w: int) -> None:
            nonlocal barrier_hits
            for j in range(per_writer):
                data = b"set k%d-%d " % (w, j) + marker(w, j)
                while True:
                    try:
                        res = await leader.propose(data)
                        break
                    except errors.EnvelopeCutoverInProgressError:
                        barrier_hits += 1
                        await trio.sleep(0.001)
                acked[data] = res.commit_index
                if len(acked) >= 40:
                    started.set()
                await trio.sleep(0.0005 * (w + 1))

        async with trio.open_nursery() as n:
            for w in range(writers):
                n.start_soon(writer, w)
            await started.wait()
            cutover = await leader.enable_raft_envelope(ciphers[lname])
        assert len(acked) == writers * per_writer
        below = [d for d, i in acked.items() if i < cutover]
        above = [d for d, i in acked.items() if i > cutover]
        assert below and above and len(below) + len(above) == len(acked)
        await c.wait_applied(leader.applied_index())
        sequences = []
        for n_ in NAMES:
            h = c.nodes[n_]
            assert h.engine is not None and h.engine.raft_cutover_index() == cutover
            applied = [d for _, d in h.fsm.log]
            counts = collections.Counter(applied)
            assert set(counts) == set(acked), f"{n_}: lost or extra proposals"
            assert max(counts.values()) == 1, f"{n_}: a proposal applied twice"
            assert {d: i for i, d in h.fsm.log} == acked  # each at the index it was acked at
            sequences.append(h.fsm.log)
            wal = wal_bytes(h.data_dir)
            for d in below:
                assert d.split(b" ")[-1] in wal
            for d in above:
                assert d.split(b" ")[-1] not in wal, f"{n_}: plaintext above the cutover"
        assert sequences[0] == sequences[1] == sequences[2]
        # Every entry above the cutover on disk is an envelope.
        storage = leader._loop.storage
        for ent in storage.entries(cutover + 1, storage.last_index() + 1):
            env = decode_proposal(ent.data)
            if env is not None:
                assert parse(env[1]).key_id == ciphers[lname].active_key_id
    # The barrier was hit by at least one writer: propose is refused while it is up.
    assert barrier_hits > 0


async def test_tampered_entry_halts_only_that_node(tmp_path, clock, kek):
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False) as c:
        ciphers = await start_all(c, tmp_path, kek)
        leader, lname = await leader_of(c)
        await leader.propose(b"set a 1")
        cutover = await leader.enable_raft_envelope(ciphers[lname])
        await leader.propose(b"set b 2")
        victim = next(n for n in NAMES if n != lname)
        vid = c.nodes[victim].node_id
        victim_engine = c.engine(victim)
        tampered: list[int] = []
        real_send = c.network._send

        def send(src, m, *rest):
            if m.to == vid and m.type is MessageType.APP and not tampered:
                ents = list(m.entries)
                for k, e in enumerate(ents):
                    if e.index > cutover and decode_proposal(e.data) is not None and e.data:
                        flipped = bytearray(e.data)
                        flipped[-1] ^= 0x01  # a bit of the GCM tag
                        ents[k] = attrs.evolve(e, data=bytes(flipped))
                        tampered.append(e.index)
                        m = attrs.evolve(m, entries=tuple(ents))
                        break
            return real_send(src, m, *rest)

        c.network._send = send
        r = await leader.propose(b"set c 3")
        with trio.fail_after(10):
            await c.nodes[victim].stopped.wait()
        err = fatal(c.nodes[victim].error)
        assert isinstance(err, errors.RaftUnwrapFailedError), err
        assert isinstance(err.__cause__, errors.IntegrityError)
        assert tampered == [r.commit_index]
        assert victim_engine.applied_index() < tampered[0]
        assert victim_engine.applied_index() == tampered[0] - 1
        assert (r.commit_index, b"set c 3") not in c.nodes[victim].fsm.log
        # The other two keep serving.
        r2 = await leader.propose(b"set d 4")
        other = next(n for n in NAMES if n not in (lname, victim))
        await c.wait_applied(r2.commit_index, [lname, other])
        assert c.nodes[other].fsm.data == {"a": "1", "b": "2", "c": "3", "d": "4"}


async def test_node_restarted_without_key_halts_then_replays_with_it(tmp_path, clock, kek):
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False) as c:
        ciphers = await start_all(c, tmp_path, kek)
        leader, lname = await leader_of(c)
        victim = next(n for n in NAMES if n != lname)
        await leader.propose(b"set a 1")
        await c.wait_applied(leader.applied_index(), [victim])
        await c.stop(victim)
        cutover = await leader.enable_raft_envelope(ciphers[lname])
        r = await leader.propose(b"set b SECRET")
        # Restarted with no cipher: it catches up to the marker and halts there.
        engine = await c.start(victim, raft_cipher=None)
        with trio.fail_after(10):
            await c.nodes[victim].stopped.wait()
        err = fatal(c.nodes[victim].error)
        assert isinstance(err, errors.RaftUnwrapFailedError), err
        assert "no raft cipher wired" in str(err)
        assert engine.applied_index() < cutover
        assert engine.err() is err
        # With its key store back it replays the same entries and converges.
        await c.start(victim, raft_cipher=ciphers[victim])
        await c.wait_applied(r.commit_index, [victim])
        fsm = c.nodes[victim].fsm
        assert fsm.data == {"a": "1", "b": "SECRET"}
        assert (r.commit_index, b"set b SECRET") in fsm.log
        assert b"SECRET" not in wal_bytes(c.nodes[victim].data_dir)


@pytest.mark.parametrize("seed", [0, 1, 3])
async def test_leader_crash_during_cutover_never_mixes_regimes(tmp_path, clock, kek, seed):
    """Crash the leader right after it proposes the marker; whoever leads next must not put
    cleartext above the marker (every node applies everything, nobody halts)."""
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False,
                                   seed=seed) as c:
        ciphers = await start_all(c, tmp_path, kek)
        c.network.set_links(c.ids(NAMES), delay=0.001)
        leader, lname = await leader_of(c)
        await leader.propose(b"set a 1")
        acked: list[bytes] = []
        stop = trio.Event()

        async def writer(w: int) -> None:
            j = 0
            while not stop.is_set():
                lead = c.leaders()
                if not lead or lead[0].engine is None:
                    await trio.sleep(0.005)
                    continue
                data = b"set w%d-%d v" % (w, j)
                try:
                    await lead[0].engine.propose(data)
                    acked.append(data)
                    j += 1
                    await trio.sleep(0.002)
                except (errors.NotAppliedError, errors.OutcomeUnknownError):
                    await trio.sleep(0.002)

        async with trio.open_nursery() as n:
            for w in range(4):
                n.start_soon(writer, w)
            await trio.sleep(0.05)

            async def enable() -> None:
                with contextlib.suppress(errors.NotAppliedError, errors.OutcomeUnknownError):
                    await leader.enable_raft_envelope(ciphers[lname])

            queued = trio.Event()
            loop = leader._loop  # white box: learn when the marker is queued
            real_submit = loop.submit

            def submit(req):
                real_submit(req)
                if is_control(getattr(req, "data", b"")):
                    queued.set()

            loop.submit = submit  # type: ignore[method-assign]
            n.start_soon(enable)
            with trio.fail_after(5):
                await queued.wait()
            await trio.sleep(0.001 * seed)  # the marker may or may not have replicated
            await c.stop(lname)
            new = await c.wait_for_leader(exclude=lname)
            await trio.sleep(0.2)
            await c.start(lname, raft_cipher=ciphers[lname])
            await trio.sleep(0.2)
            stop.set()
        for h in c.nodes.values():
            assert h.error is None, (h.name, h.error)
        await c.wait_applied(new.applied_index())
        logs = [[d for _, d in c.nodes[n_].fsm.log if b"w" in d] for n_ in NAMES]
        for data in acked:
            assert all(data in log for log in logs)


async def test_the_leader_applies_its_own_entries_without_decrypting_them(tmp_path, clock, kek):
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False) as c:
        ciphers = await start_all(c, tmp_path, kek)
        leader, lname = await leader_of(c)
        cutover = await leader.enable_raft_envelope(ciphers[lname])
        await c.wait_applied(leader.applied_index())
        before = {n: ciphers[n].counters() for n in NAMES}
        for i in range(20):
            await leader.propose(b"set k%d v%d" % (i, i))
        await c.wait_applied(leader.applied_index())
        for n in NAMES:
            done = ciphers[n].counters()
            wraps = done.wraps - before[n].wraps
            unwraps = done.unwraps - before[n].unwraps
            # The leader made these envelopes and kept their plaintexts; the others decrypt.
            assert (wraps, unwraps) == ((20, 0) if n == lname else (0, 20)), n
            assert [d for _, d in c.nodes[n].fsm.log][-20:] == [
                b"set k%d v%d" % (i, i) for i in range(20)]
        # The kept plaintext is used only for the very envelope it was kept with.
        gate = leader._loop.gate
        mine = gate.wrap_admitted([ProposeRequest(4242, b"set x 1", Waiter(), seal=True)])[0]
        other = ciphers[lname].wrap(b"set y 2")
        assert gate.unwrap(cutover + 100, other, 4242) == b"set y 2"  # decrypted
        assert gate.unwrap(cutover + 100, mine, 4242) == b"set x 1"  # decrypted too: dropped
        assert ciphers[lname].counters().unwraps == before[lname].unwraps + 2


async def test_a_batch_holding_a_rotation_and_entries_under_the_new_key_applies(
        tmp_path, clock, kek):
    # A follower cut off while the key rotates gets, once healed, the rotation record and the
    # entries wrapped under the new key in one batch: what the batch decryption ahead of the
    # apply cannot open yet (the new key installs when the record applies) is decrypted in
    # its turn, and tampering is still caught entry by entry.
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False) as c:
        ciphers = await start_all(c, tmp_path, kek)
        leader, lname = await leader_of(c)
        await leader.enable_raft_envelope(ciphers[lname])
        for i in range(5):
            await leader.propose(b"set before%d x" % i)
        await c.wait_applied(leader.applied_index())
        lagging = next(n for n in NAMES if n != lname)
        c.isolate(lagging)
        new_key = await leader.rotate_raft_key()
        for i in range(30):
            await leader.propose(b"set after%d y" % i)
        before = ciphers[lagging].counters()
        c.heal()
        await c.wait_applied(leader.applied_index())
        assert c.engine(lagging).err() is None
        assert ciphers[lagging].active_key_id == new_key
        assert [d for _, d in c.nodes[lagging].fsm.log] == [d for _, d in c.nodes[lname].fsm.log]
        after = ciphers[lagging].counters()
        assert after.unwraps - before.unwraps == 30 and after.unwrap_failures == 0
