"""Envelope integration on a single-node engine: cutover, restart, barrier, rotation, scanner,
fatal unwrap and replay."""

from __future__ import annotations

import os

import pytest
import trio

import trio_raft
from tests.engine.test_single_node import cfg
from tests.envelope.helpers import RecordingKV, TolerantKV, open_cipher, wal_bytes
from trio_raft import State, errors
from trio_raft.engine import envelope_gate
from trio_raft.engine import lifecycle as engine_mod
from trio_raft.engine.contexts import decode_proposal
from trio_raft.engine.envelope_scan import EncryptionScanner
from trio_raft.envelope import Cipher, EncryptionScanError, ReservedPrefixError, parse
from trio_raft.storage.cutover import CUTOVER_FILE, load_cutover, save_cutover


class SpyEngine(engine_mod.Engine):
    """Records every engine open_engine builds (to inspect one whose startup failed)."""

    instances: list[engine_mod.Engine] = []

    def __init__(self, loop):
        super().__init__(loop)
        SpyEngine.instances.append(self)


@pytest.fixture
def spy(monkeypatch):
    SpyEngine.instances = []
    monkeypatch.setattr(engine_mod, "Engine", SpyEngine)
    return SpyEngine.instances


class FlakyCipher(Cipher):
    """A real cipher whose unwrap can be made to fail (as a damaged entry would)."""

    fail_unwrap = False

    def unwrap(self, data: bytes) -> bytes:
        if self.fail_unwrap:
            raise errors.IntegrityError("injected")
        return super().unwrap(data)

    def unwrap_batch(self, payloads):  # type: ignore[no-untyped-def]
        # Nothing opens ahead of the apply: each entry then goes through ``unwrap``.
        return {} if self.fail_unwrap else super().unwrap_batch(payloads)


def payload_at(engine, index: int) -> bytes:
    ent = engine._loop.storage.entries(index, index + 1)[0]
    env = decode_proposal(ent.data)
    assert env is not None
    return env[1]


async def test_enable_wraps_later_entries_and_restart_keeps_regime(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    c = cfg(tmp_path, RecordingKV(), raft_cipher=cipher)
    async with trio_raft.open_engine(c) as engine:
        assert engine.raft_cutover_index() is None
        before = await engine.propose(b"set a CLEAR-BEFORE")
        cutover = await engine.enable_raft_envelope(cipher)
        assert cutover > before.commit_index
        assert engine.raft_cutover_index() == cutover
        assert await engine.enable_raft_envelope(cipher) == cutover  # idempotent
        after = await engine.propose(b"set b SECRET-AFTER")
        assert after.commit_index > cutover
        env = parse(payload_at(engine, after.commit_index))
        assert env.key_id == cipher.active_key_id == 1
        assert c.state_machine.data == {"a": "CLEAR-BEFORE", "b": "SECRET-AFTER"}
    wal = wal_bytes(c.data_dir)
    assert b"CLEAR-BEFORE" in wal
    assert b"SECRET-AFTER" not in wal
    assert load_cutover(c.data_dir) == cutover
    # Restart: the cutover comes back from the file; replay unwraps; new proposals wrap.
    fsm2 = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm2, raft_cipher=cipher)) as engine:
        assert engine.raft_cutover_index() == cutover
        assert fsm2.data == {"a": "CLEAR-BEFORE", "b": "SECRET-AFTER"}
        r = await engine.propose(b"set c SECRET-AGAIN")
        parse(payload_at(engine, r.commit_index))
    assert b"SECRET-AGAIN" not in wal_bytes(c.data_dir)


async def test_cutover_callable_overrides_the_file(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    c = cfg(tmp_path, RecordingKV(), raft_cipher=cipher)
    async with trio_raft.open_engine(c) as engine:
        await engine.propose(b"set a 1")
        cutover = await engine.enable_raft_envelope(cipher)
        await engine.propose(b"set b 2")
    # An explicit callable wins: "inert" means nothing is unwrapped; an entry that is an
    # envelope under an installed key then cannot be classified, and the engine stops before
    # the state machine sees ciphertext.
    inert = RecordingKV()
    with pytest.raises(errors.EnvelopeRegimeError, match="taken for cleartext"):
        async with trio_raft.open_engine(cfg(tmp_path, inert, raft_cipher=cipher,
                                             raft_cutover_index=lambda: (1 << 64) - 1)):
            pass
    assert [p for _i, p in inert.log] == [b"set a 1"]
    ok = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, ok, raft_cipher=cipher,
                                         raft_cutover_index=lambda: cutover)) as engine:
        assert engine.raft_cutover_index() == cutover
    assert ok.data == {"a": "1", "b": "2"}


async def test_unwrap_failure_is_fatal_and_the_entry_replays(tmp_path, kek, monkeypatch):
    # The node keeps no plaintext of its own proposals: it decrypts every entry it applies
    # (by default a leader applies its own entries from the plaintexts it kept).
    monkeypatch.setattr(envelope_gate, "OWN_PLAINTEXTS", 0)
    cipher = FlakyCipher(*_parts(open_cipher(tmp_path, "n1", kek)))
    fsm = RecordingKV()
    seen: list[BaseException] = []
    refs: list[trio_raft.Engine] = []
    with pytest.raises(errors.RaftUnwrapFailedError) as info:
        async with trio_raft.open_engine(cfg(tmp_path, fsm, raft_cipher=cipher)) as engine:
            refs.append(engine)
            await engine.enable_raft_envelope(cipher)
            good = await engine.propose(b"set a 1")
            cipher.fail_unwrap = True

            async def waiter(data: bytes) -> None:
                try:
                    await engine.propose(data)
                except (errors.EngineFailedError, errors.EngineClosedError) as exc:
                    seen.append(exc)  # seen by raft: unknown; still queued: not applied

            async with trio.open_nursery() as n:
                n.start_soon(waiter, b"set b 2")
                n.start_soon(waiter, b"set c 3")
            await trio.sleep_forever()
    engine = refs[0]
    assert isinstance(info.value.__cause__, errors.IntegrityError)
    assert "halting apply" in str(info.value)
    # Each waiter got its own error, caused by the one fatal error.
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(e.__cause__ is info.value for e in seen)
    assert engine.state() is State.SHUTDOWN
    assert engine.applied_index() == good.commit_index  # not past the failing entry
    assert [d for _, d in fsm.log][-1] == b"set a 1"
    with pytest.raises(errors.EngineClosedError) as later:  # refused: not applied
        await engine.propose(b"set d 4")
    assert later.value.__cause__ is info.value
    # A restart with a working cipher replays the very entry that failed (not skipped).
    cipher.fail_unwrap = False
    fsm2 = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm2, raft_cipher=cipher)) as engine:
        assert fsm2.data["a"] == "1"
        indexes = [i for i, _ in fsm2.log]
        assert good.commit_index + 1 in indexes
        assert fsm2.data.get("b") == "2" or fsm2.data.get("c") == "3"


async def test_restart_without_the_key_halts_before_the_entry_then_replays(tmp_path, kek, spy):
    cipher = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher)) as engine:
        await engine.propose(b"set a 1")
        cutover = await engine.enable_raft_envelope(cipher)
        wrapped = await engine.propose(b"set b 2")
    spy.clear()
    fsm = RecordingKV()
    with pytest.raises(errors.RaftUnwrapFailedError, match="no raft cipher wired"):
        async with trio_raft.open_engine(cfg(tmp_path, fsm)):
            pass
    failed = spy[-1]
    assert isinstance(failed.err(), errors.RaftUnwrapFailedError)
    assert failed.applied_index() < cutover < wrapped.commit_index
    assert fsm.data == {"a": "1"}
    # The wrong KEK fails just as clearly (the key store refuses to open).
    from trio_raft.envelope import KEK, KEKError

    with pytest.raises(KEKError, match="does not match"):
        open_cipher(tmp_path, "n1", KEK.generate())
    fsm2 = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm2, raft_cipher=cipher)) as engine:
        assert engine.applied_index() >= wrapped.commit_index
    assert (wrapped.commit_index, b"set b 2") in fsm2.log


async def test_barrier_refuses_propose_but_admits_propose_admin(tmp_path, kek, monkeypatch):
    cipher = open_cipher(tmp_path, "n1", kek)
    fsm = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm, raft_cipher=cipher)) as engine:
        await engine.propose(b"set a 1")
        gate = trio.Event()
        entered = trio.Event()
        envelope = engine._loop.gate  # white box: hold the cutover while the log drains
        original = envelope.wait_log_applied

        async def held(port) -> None:
            entered.set()
            await gate.wait()
            await original(port)

        monkeypatch.setattr(envelope, "wait_log_applied", held)
        result: list[int] = []
        async with trio.open_nursery() as n:
            n.start_soon(lambda: _collect(engine.enable_raft_envelope(cipher), result))
            await entered.wait()
            with pytest.raises(errors.EnvelopeCutoverInProgressError):
                await engine.propose(b"set b 2")
            with pytest.raises(errors.EnvelopeCutoverInProgressError):
                await engine.enable_raft_envelope(cipher)
            admin = await engine.propose_admin(b"set adm 1")
            gate.set()
        assert result[0] > admin.commit_index
        assert fsm.data == {"a": "1", "adm": "1"}
        await engine.propose(b"set b 2")  # released
    assert b"set adm 1" in wal_bytes(str(tmp_path / "n1"))


async def _collect(coro, out):
    out.append(await coro)


async def test_reserved_prefix(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    forged = b"\xe1TRENV\x01" + bytes(80)
    fsm = TolerantKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm, raft_cipher=cipher)) as engine:
        with pytest.raises(ReservedPrefixError):
            await engine.propose(forged)
        with pytest.raises(ReservedPrefixError):
            await engine.propose_admin(forged)
        await engine.enable_raft_envelope(cipher)
        # Above the cutover user payloads are wrapped, so the same bytes are plain data.
        r = await engine.propose(forged)
        parse(payload_at(engine, r.commit_index))
        assert fsm.log[-1] == (r.commit_index, forged)


async def test_rotation_is_replicated_and_old_keys_still_read(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    fsm = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm, raft_cipher=cipher)) as engine:
        with pytest.raises(errors.NilKeystoreError):
            await engine.enable_raft_envelope(None)
        cutover = await engine.enable_raft_envelope(cipher)
        r1 = await engine.propose(b"set a 1")
        assert await engine.rotate_raft_key() == 2
        r2 = await engine.propose(b"set b 2")
        assert parse(payload_at(engine, r1.commit_index)).key_id == 1
        assert parse(payload_at(engine, r2.commit_index)).key_id == 2
        assert cipher.active_key_id == 2
        scanner = engine.encryption_scanner()
        last = engine.status().last_log_index
        assert scanner.has_encryption_relevant_entry_in_range(1, last)
        assert scanner.has_encryption_relevant_entry_in_range(cutover - 1, cutover)
        assert not scanner.has_encryption_relevant_entry_in_range(cutover, r1.commit_index)
        assert not scanner.has_encryption_relevant_entry_in_range(r2.commit_index, last)
        assert not scanner.has_encryption_relevant_entry_in_range(5, 5)
        with pytest.raises(EncryptionScanError):
            scanner.has_encryption_relevant_entry_in_range(0, (1 << 64) - 1)
        with pytest.raises(errors.UnavailableError):
            scanner.has_encryption_relevant_entry_in_range(1, last + 10)
    with pytest.raises(EncryptionScanError, match="no log storage"):
        EncryptionScanner(lambda: None).has_encryption_relevant_entry_in_range(0, 1)
    # Both keys are persisted (sealed); replay reads entries under either key.
    assert cipher.keystore is not None and cipher.keystore.key_ids() == [1, 2]
    fsm2 = RecordingKV()
    reopened = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, fsm2, raft_cipher=reopened)):
        assert fsm2.data == {"a": "1", "b": "2"}
    assert reopened.active_key_id == 2


def test_cutover_file_is_checked(tmp_path):
    from trio_raft.envelope import KeyStoreCorruptError

    save_cutover(str(tmp_path), 12)
    assert load_cutover(str(tmp_path)) == 12
    path = tmp_path / CUTOVER_FILE
    data = bytearray(path.read_bytes())
    data[8] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(KeyStoreCorruptError):
        load_cutover(str(tmp_path))
    os.unlink(path)
    assert load_cutover(str(tmp_path)) is None


def _parts(c: Cipher):
    return c.keystore, c.nonces


async def test_damaged_proposal_header_above_cutover_is_not_skipped(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher)) as engine:
        cutover = await engine.enable_raft_envelope(cipher)
        from trio_raft.core.messages import Entry

        with pytest.raises(errors.RaftUnwrapFailedError, match="not a proposal envelope"):
            await engine._loop.applier.apply([Entry(1, cutover + 50, data=b"\x09garbage")])
        await engine._loop.applier.apply([Entry(1, cutover + 51)])  # an empty no-op is fine
